"""Throughput accounting: model FLOPs per image, a measured matmul ceiling, MFU, and bf16 weight caching.

A training step's "model FLOPs" count the matrix multiplications only (linear layers, convolutions,
attention scores and the attention-weighted sum), 2 FLOPs per multiply-add, forward + backward; the
backward pass costs twice the forward except where no input gradient is needed (the patch embedding, whose
input is the image). Element-wise work (norms, GELU, softmax, the optimizer) is not counted: it is the
overhead MFU exposes.

Trainer wiring (the whole API the trainer needs)::

    flops = model_flops_per_image(model)                # once, before training (FLOPs per image per step)
    ceiling = measure_matmul_ceiling(torch.bfloat16)    # once at start-up (FLOP/s), or a number given
    ...
    print(f"{imgs_per_s:.1f} img/s, MFU {mfu(imgs_per_s, flops, ceiling):.1%}")
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter

from ..layers.patch_embed import to_2tuple
from ..protocols import CountsFlops

__all__ = [
    "count_flops_per_image",
    "model_flops_per_image",
    "flops_and_ceiling",
    "measure_matmul_ceiling",
    "mfu",
]


def _register_cpu_sdpa_formulas() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash kernel; count it the same way."""
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(fwd)
        def _fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)

    if bwd is not None and bwd not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(bwd)
        def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_register_cpu_sdpa_formulas()


# ---------------------------------------------------------------------------------------------------------
# Measured count for any model


def _example_images(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "img_size"):
        raise ValueError("cannot infer the input size of this model; pass `images=` explicitly")
    h, w = to_2tuple(config.img_size)
    param = next(model.parameters())
    return torch.randn(batch_size, getattr(config, "in_chans", 3), h, w, device=param.device)


def count_flops_per_image(
    model: nn.Module, images: torch.Tensor | None = None, training: bool = True, **forward_kwargs: Any
) -> int:
    """Count matmul FLOPs per image with `torch.utils.flop_counter.FlopCounterMode` on one real step.

    Runs `model(images).loss` (default: one random image) and, with `training=True`, the gradient with
    respect to every trainable parameter through `torch.autograd.grad`, so `.grad` fields, the RNG state
    and train/eval mode are left as they were. Works for any method following the mimkit contract.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]), flop_counter.FlopCounterMode(display=False) as counter:
        if images is None:
            images = _example_images(model)
        if training:
            loss = model(images, **forward_kwargs).loss
            torch.autograd.grad(loss, params, allow_unused=True)
        else:
            with torch.no_grad():
                model(images, **forward_kwargs)
    return int(counter.get_total_flops()) // images.shape[0]


def model_flops_per_image(model: nn.Module, training: bool = True) -> int:
    """Matmul FLOPs per image of one training step (forward + backward) or, `training=False`, a forward.

    A model that knows its own count exactly offers `model.flops_per_image(training)` (MAE: analytic, equal
    to FlopCounterMode's); any other model is measured with `count_flops_per_image` on one image (call it
    once, at start-up: it costs about one batch-1 step).
    """
    if isinstance(model, CountsFlops):
        return int(model.flops_per_image(training))
    return count_flops_per_image(model, training=training)


# ---------------------------------------------------------------------------------------------------------
# Ceiling and MFU


def measure_matmul_ceiling(
    dtype: torch.dtype = torch.float32,
    size: int = 2048,
    repeats: int = 5,
    device: str | torch.device = "cpu",
) -> float:
    """FLOP/s of a large square matmul (`size`^3, the best of `repeats` after one warm-up) in `dtype`.

    This is the practical peak the model's matmuls could reach on this machine with the current thread
    settings. It takes about a second on CPU.
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first call is a warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def flops_and_ceiling(
    model: nn.Module, ceiling: float | None, precision: str = "fp32", device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """(model FLOPs per image per training step, matmul FLOP/s ceiling) for a run's MFU: the ceiling given,
    or measured at the run's precision ("bf16" or "fp32") on `device`."""
    flops = float(model_flops_per_image(model))
    if ceiling is None:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        ceiling = measure_matmul_ceiling(dtype, device=device)
    return flops, float(ceiling)


def mfu(images_per_second: float, flops_per_image: float, ceiling_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s divided by the matmul ceiling (0.4 = 40%)."""
    if ceiling_flops_per_second <= 0:
        raise ValueError("the matmul ceiling must be positive; measure it with measure_matmul_ceiling()")
    return images_per_second * flops_per_image / ceiling_flops_per_second
