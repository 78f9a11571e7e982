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
from .checkpoint import load_model_weights, load_optimizer_state, model_weights, optimizer_state


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
            setattr(block, "_mimkit_checkpointed", True)  # noqa: B010  a plain attribute, not a submodule
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


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the full (unsharded) state dict on rank 0 as CPU tensors; other ranks get {}. Collective."""
    return model_weights(model)


def load_full_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Load a full (single-process layout) state dict into a sharded model; every rank passes it."""
    load_model_weights(model, state_dict, strict)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Gather the optimizer state as a plain `optimizer.state_dict()` (integer ids) on rank 0. Collective."""
    return optimizer_state({"model": model}, optimizer)


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """Load a plain `optimizer.state_dict()` (from any run) into the optimizer of a sharded model."""
    load_optimizer_state({"model": model}, optimizer, state_dict)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
