"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for large encoders, activation checkpointing, and checkpoints
that move freely between FSDP runs and single-process runs.

Sharding: every transformer / conv block (`Block`, `CrossAttentionBlock`, `ConvBlock`) is one FSDP unit,
the root model (embeddings, tokens, norms, heads) is the last one. Parameters keep their names, so the
full state dict gathered here is exactly a single-process `model.state_dict()`.

Use from a trainer (all ranks call every function; `fully_shard` replaces the parameters, so build the
optimizer after `shard_model`):

    model = shard_model(model, activation_checkpointing=True)
    optimizer = torch.optim.AdamW(param_groups(model, wd), ...)
    # gradient accumulation: model.set_requires_gradient_sync(i == accum - 1) before each micro-batch
    state = full_model_state_dict(model)                  # rank 0: full CPU tensors, others: {}
    optim = full_optimizer_state_dict(model, optimizer)   # rank 0: a plain optimizer.state_dict(), others: {}
    load_full_model_state_dict(model, ckpt["model"])      # every rank passes the full dict
    load_full_optimizer_state_dict(model, optimizer, ckpt["optimizer"])

The optimizer state is exchanged in `torch.optim.Optimizer.state_dict()` layout (integer parameter ids in
param-group order), so a checkpoint's optimizer state loads in a plain run and back, as long as both build
their parameter groups the same way (the trainer's `param_groups(model, ...)`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import Block
from ..layers.cross_attention import CrossAttentionBlock


def _block_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [Block, CrossAttentionBlock]
    try:
        from ..backbones.convvit import ConvBlock

        types.append(ConvBlock)
    except ImportError:  # pragma: no cover - ConvMAE backbone absent
        pass
    return tuple(types)


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """Every transformer / conv block in `model` (the units that are sharded and checkpointed)."""
    types = _block_types()
    return [m for m in model.modules() if isinstance(m, types)]


def _checkpointed_forward(original, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    return original(*args, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's `forward` is wrapped in place, so parameter names (and checkpoints) do not change.
    """
    for block in blocks_of(model):
        if not getattr(block, "_mimkit_checkpointed", False):
            block.forward = functools.partial(_checkpointed_forward, block.forward)
            block._mimkit_checkpointed = True
    return model


def shard_model(
    model: nn.Module,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    mesh: Any = None,
    sync_module_states: bool = True,
) -> nn.Module:
    """Shard `model` in place with FSDP2 across the default process group; returns the same module.

    sync_module_states: first broadcast rank 0's parameters and buffers (as DDP does), so a model
    initialised differently on each rank starts from rank 0's weights, like a DDP or single-process run.

    param_dtype: compute dtype for gathered parameters (e.g. torch.bfloat16; gradients are reduced in
    float32); None keeps the parameters' dtype. `mesh`: a DeviceMesh (default: all ranks, one dimension).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model needs an initialised process group; launch with torchrun")
    if sync_module_states:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks_of(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) state dict on rank 0 as CPU tensors; other ranks get {}. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_full_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Load a full (single-process layout) state dict into a sharded model; every rank passes it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state_dict, options=_options(strict=strict))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (its integer ids)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise ValueError(
                    "the optimizer holds a parameter that is not part of the sharded model (e.g. an online "
                    "probe); give such parameters their own optimizer, or train without FSDP"
                )
            names.append(name_of[id(p)])
    return names


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Gather the optimizer state as a plain `optimizer.state_dict()` (integer ids) on rank 0. Collective."""
    from torch.distributed.tensor import DTensor

    _param_names(model, optimizer)  # checks that every parameter belongs to the model
    main = dist.get_rank() == 0
    plain = optimizer.state_dict()  # integer ids in param-group order; sharded tensors stay DTensors
    state: dict[int, dict[str, Any]] = {}
    for pid in sorted(plain["state"]):
        entry = {}
        for key, value in plain["state"][pid].items():
            if isinstance(value, DTensor):
                value = value.full_tensor()  # collective: every rank walks the same ids in the same order
            entry[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
        state[pid] = entry
    return {"state": state, "param_groups": plain["param_groups"]} if main else {}


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """Load a plain `optimizer.state_dict()` (from any run) into the optimizer of a sharded model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    _param_names(model, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for pid, entry in state_dict["state"].items():
        p = params[int(pid)]
        new = {}
        for key, value in entry.items():
            if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.shape == p.shape:
                value = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements)
            elif isinstance(value, torch.Tensor):
                value = value.clone()  # never share a tensor (e.g. `step`) with the source optimizer
            new[key] = value
        state[pid] = new
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
