"""One command that proves mimkit's CUDA paths and measures them, printed as JSON (<= 8 minutes on a GPU).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_<device>.json
    python benchmarks/gpu_check.py --dry-run        # tiny models on the CPU in seconds (what the test suite runs)

Sections of the report:

- `parity`: for MAE, CAE and ConvMAE, one fp32 forward + backward of the same weights, batch and mask on the
  CPU and on the device (TF32 off); relative loss difference and the worst gradient difference (max |diff|
  of a parameter's gradient over the max |grad| of that parameter); passes at `--tol` (1e-4).
- `train`: ViT-B train steps of MAE, CAE and ConvMAE at `--batch-size` (128) in bf16 through the trainer's own
  `Trainer.train_step` (bf16 autocast, fused AdamW, non-blocking host-to-device copies of a pinned batch,
  SDPA attention), and Hugging Face `ViTMAEForPreTraining` built from the same MAE config with the same
  AdamW and autocast, alternating in ABBA order over `--rounds` rounds of `--steps` steps. Per entry:
  median img/s, every round, MFU against the device's bf16 peak (the table below, by device name) and
  against the measured bf16 matmul ceiling, and the peak memory the step added
  (`torch.cuda.max_memory_allocated` minus the memory allocated before the model was built). Once eager,
  then with `torch.compile` (`train.compile=true`, the whole model; compile time = first step - median step)
  and, for MAE, with only its blocks compiled (`mae_regional`, `mimkit.layers.compile_blocks`).
- `loader`: the trainer's own data loader alone (synthetic 224 px images, MAE transforms and masks), img/s.
- `ddp`: with >= 2 GPUs, 2-rank steps over NCCL (torch.multiprocessing spawn) through the trainer's own DDP
  wrapping for each method, and its FSDP2 sharding for MAE (`mae_fsdp`): img/s over both ranks, and
  whether the weights stay identical across ranks.

Anything that fails is recorded under its section as `error` (the rest still runs); sections that would not
fit in `--budget-s` are recorded as `skipped` with the reason. `--dry-run` runs every section on the CPU with
the tiny presets (the 2-rank DDP step over gloo), so CI proves the script without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

try:
    import mimkit
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import mimkit

from mimkit.commands.bench import cpu_info, hf_config, transformers_missing
from mimkit.engine.perf import measure_matmul_ceiling, model_flops_per_image
from mimkit.layers import set_fused_attention
from mimkit.methods.mae import mae_flops_per_image

SCHEMA = "mimkit.gpu_check/1"
# A gradient's difference is measured against its own largest entry, but never against less than this
# fraction of the largest gradient entry in the model: some gradients are zero in exact arithmetic and pure
# rounding noise in practice (CAE's norm_k.bias: a shift shared by every key leaves the softmax unchanged;
# ~1e-8 against a largest entry ~4).
FLOOR = 1e-4
METHODS = ("mae", "cae", "convmae")
BASE_MODELS = {
    "mae": "mae_vit_base_patch16_224",
    "cae": "cae_vit_base_patch16_224",
    "convmae": "convmae_base_patch16_224",
}
TINY_MODELS = {
    "mae": "mae_vit_tiny_patch4_32",
    "cae": "cae_vit_tiny_patch4_32",
    "convmae": "convmae_tiny_patch8_64",
}
# Shrunk further for the dry run, so the whole CPU run takes seconds.
DRY_OVERRIDES = {
    "mae": {"depth": 2, "decoder_depth": 1},
    "cae": {"depth": 2, "regressor_depth": 1, "decoder_depth": 1},
    "convmae": {"depths": (1, 1, 2), "decoder_depth": 1},
}

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in this order (more specific names first).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)


def table_peak(device_name: str) -> tuple[str | None, float | None]:
    """(table entry, FLOP/s) for a device name, or (None, None) when the name is not in the table."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return key, tflops * 1e12
    return None, None


# ---------------------------------------------------------------------------------------------------------
# helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error(err: BaseException) -> dict[str, str]:
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}


def _model_name(method: str, dry: bool) -> str:
    return TINY_MODELS[method] if dry else BASE_MODELS[method]


def _overrides(method: str, dry: bool) -> dict[str, Any]:
    from mimkit.registry import model_config

    fields = {f.name for f in dataclasses.fields(model_config(_model_name(method, dry)))}
    out = dict(DRY_OVERRIDES[method]) if dry else {}
    if "drop_path_rate" in fields:
        out["drop_path_rate"] = 0.0  # no randomness beyond the mask
    return out


def _image_size(model) -> tuple[int, int, int]:
    from mimkit.layers import to_2tuple

    c = model.config
    return (c.in_chans, *to_2tuple(c.img_size))


class Budget:
    """Wall-clock budget for the whole run: a section starts only if its estimate still fits."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


# ---------------------------------------------------------------------------------------------------------
# parity


@contextlib.contextmanager
def _no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _loss_and_grads(model, images, mask) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(images, mask).loss
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def parity(method: str, device: torch.device, dry: bool, batch_size: int, tol: float) -> dict[str, Any]:
    """fp32 forward + backward of one model, batch and mask on the CPU and on `device`."""
    torch.manual_seed(0)
    cpu_model = mimkit.create_model(_model_name(method, dry), **_overrides(method, dry)).train()
    dev_model = copy.deepcopy(cpu_model).to(device)
    if device.type == "cpu":  # the dry run: compare against the plain-math attention path, so the
        set_fused_attention(dev_model, False)  # comparison sees real (tiny) rounding differences
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch_size, *_image_size(cpu_model), generator=gen)
    grid = getattr(cpu_model, "grid_size", None)
    mask = cpu_model.mask_generator(batch_size, torch.Generator().manual_seed(2))
    with _no_tf32():  # nothing random runs: the mask is given and drop path is off
        loss_cpu, grads_cpu = _loss_and_grads(cpu_model, images, mask)
        loss_dev, grads_dev = _loss_and_grads(dev_model, images.to(device), mask.to(device))
    missing = sorted(set(grads_cpu) ^ set(grads_dev))
    scale = max(g.abs().max().item() for g in grads_cpu.values())
    worst, worst_name, global_max = 0.0, None, 0.0
    for name, g in grads_cpu.items():
        if name not in grads_dev:
            continue
        diff = (g - grads_dev[name]).abs().max().item()
        global_max = max(global_max, diff)
        rel = diff / max(g.abs().max().item(), FLOOR * scale, 1e-30)
        if rel > worst:
            worst, worst_name = rel, name
    loss_rel = abs(loss_cpu - loss_dev) / max(abs(loss_cpu), 1e-30)
    return {
        "model": _model_name(method, dry),
        "compared": "cpu vs cpu with plain-math attention (dry run)"
        if device.type == "cpu"
        else f"cpu vs {device}",
        "batch_size": batch_size,
        "grid_size": list(grid) if grid is not None else None,
        "loss_cpu": loss_cpu,
        "loss_device": loss_dev,
        "loss_rel_diff": loss_rel,
        "grad_max_rel_diff": worst,
        "grad_worst_param": worst_name,
        "grad_max_abs_diff_over_max_grad": global_max / max(scale, 1e-30),
        "params_with_grad": len(grads_cpu),
        "grad_set_mismatch": missing,
        "tolerance": tol,
        "pass": bool(loss_rel <= tol and worst <= tol and not missing),
    }


# ---------------------------------------------------------------------------------------------------------
# train steps


def _train_config(model_name: str, overrides: dict, batch_size: int, device: str, compile_: bool, out_dir: str,
                  ceiling: float | None, distributed: str = "ddp") -> Any:  # fmt: skip
    from mimkit.engine.config import config_from_dict

    return config_from_dict(
        {
            "model": {"name": model_name, **overrides},
            "data": {
                "source": "synthetic",
                "num_samples": 4 * batch_size,  # a full batch on each of up to 4 ranks
                "batch_size": batch_size,
                "num_workers": 0,
            },
            "optim": {"lr": 1e-4, "warmup_steps": 0},
            "train": {
                "device": device,
                "precision": "bf16",
                "compile": compile_,
                "output_dir": out_dir,
                "max_steps": 1000,
                "progress": False,
                "matmul_ceiling": ceiling,
                "log_every": 1000,
                "ckpt_every": 1000,
                "distributed": distributed,
            },  # fmt: skip
        }
    )


class TrainerRunner:
    """A mimkit method through `Trainer.train_step`, fed one fixed pinned batch (the loader is measured apart)."""

    def __init__(
        self, method, dry, batch_size, device, compile_, out_dir, ceiling, distributed="ddp", regional=False
    ):
        from mimkit.engine.trainer import Trainer
        from mimkit.layers import compile_blocks

        cfg = _train_config(_model_name(method, dry), _overrides(method, dry), batch_size, device.type,
                            compile_, out_dir, ceiling, distributed)  # fmt: skip
        torch.manual_seed(0)
        self.trainer = t = Trainer(cfg)
        model = t.model
        if regional:  # the blocks compiled in place: the trainer's step then runs them
            compile_blocks(model)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, *_image_size(model), generator=gen)
        mask = model.mask_generator(batch_size, gen)  # ConvMAE's too: drawn on its stage-3 grid
        labels = torch.zeros(batch_size, dtype=torch.long)
        if device.type == "cuda":
            images, mask, labels = images.pin_memory(), mask.pin_memory(), labels.pin_memory()
        self.batches = itertools.repeat((images, mask, labels))
        self.flops_per_image = float(model_flops_per_image(model))  # what the trainer's fit() logs against
        self.wiring = {
            "param_device": str(next(model.parameters()).device),
            "fused_adamw": bool(t.optimizer.defaults.get("fused")),
            "autocast": f"{device.type}/bf16",
            "loader_pin_memory": bool(t.train_loader.pin_memory),
            "compiled": "blocks" if regional else compile_,
        }

    def step(self) -> None:
        self.trainer.train_step(self.batches)

    def close(self) -> None:
        self.trainer.close()


class PeerRunner:
    """Hugging Face ViTMAE from the MAE config, with the trainer's AdamW (fused on CUDA) and bf16 autocast."""

    def __init__(self, dry, batch_size, device, compile_):
        from transformers import ViTMAEForPreTraining

        mae = mimkit.create_model(_model_name("mae", dry), **_overrides("mae", dry))
        self.device = device
        torch.manual_seed(0)
        self.model = ViTMAEForPreTraining(hf_config(mae.config)).to(device).train()
        self.train_model = torch.compile(self.model) if compile_ else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
        self.flops_per_image = float(mae_flops_per_image(mae.config))
        images = torch.randn(batch_size, *_image_size(mae), generator=torch.Generator().manual_seed(0))
        self.images = images.pin_memory() if device.type == "cuda" else images

    def step(self) -> None:
        images = self.images.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.train_model(pixel_values=images).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _count_syncs(runner, device: torch.device) -> dict[str, Any]:
    """Host-device synchronisations in one step, as torch's CUDA sync debug mode reports them."""
    if device.type != "cuda":
        return {"syncs_per_step": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [str(w.message).splitlines()[0][:200] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"syncs_per_step": len(found), "syncs_first": found[:5]}


def _build_and_warm(name, make, device, warmup) -> tuple[Any, dict[str, Any]]:
    """Build a runner and run its warm-up steps; the first step's time and the peak memory it needed."""
    _sync(device)
    before = _allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    runner = make()
    build_s = time.perf_counter() - start
    times = []
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        runner.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    info: dict[str, Any] = {"build_s": build_s, "warmup_step_s": times}
    if device.type == "cuda":
        info["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        info["peak_memory_mb"] = None  # the CPU dry run has no allocator statistics
    info |= _count_syncs(runner, device)
    return runner, info


def train_phase(dry, device, batch_size, compile_, rounds, steps, warmup, ceilings, budget, out_dir) -> dict:
    """Build every runner (memory measured on its warm-up), then time them alternating in ABBA order."""
    names = ["mae", "peer", "cae", "convmae"]  # the MAE-vs-peer pair first, should the budget run out
    if compile_:  # and MAE with only its blocks compiled (mimkit.layers.compile_blocks), after the pair
        names.insert(2, "mae_regional")
    phase: dict[str, Any] = {}
    runners: dict[str, Any] = {}
    estimate = 15.0 if not compile_ else 120.0  # seconds to build + warm one runner (compile: minutes)
    if dry:
        estimate = 1.0
    for name in names:
        if name == "peer" and (reason := transformers_missing()):
            phase[name] = {"skipped": reason}
            continue
        if not budget.allows(estimate + 30):
            phase[name] = {"skipped": f"time budget: {budget.left():.0f} s left, ~{estimate:.0f} s needed"}
            continue
        if name == "peer":
            make = lambda: PeerRunner(dry, batch_size, device, compile_)  # noqa: E731
        elif name == "mae_regional":
            make = lambda: TrainerRunner("mae", dry, batch_size, device, False,  # noqa: E731
                                         os.path.join(out_dir, "mae_regional"), ceilings["used"], regional=True)  # fmt: skip
        else:
            make = lambda m=name: TrainerRunner(m, dry, batch_size, device, compile_,  # noqa: E731
                                                 os.path.join(out_dir, f"{m}_{int(compile_)}"), ceilings["used"])  # fmt: skip
        try:
            runners[name], phase[name] = _build_and_warm(name, make, device, warmup)
        except Exception as err:  # noqa: BLE001  (recorded; the other runners still run)
            phase[name] = _error(err)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    order = [n for n in names if n in runners]
    rounds_s: dict[str, list[float]] = {n: [] for n in order}
    for r in range(rounds):
        if not budget.allows(5):
            break
        for name in list(order) if r % 2 == 0 else order[::-1]:  # a copy: a failing runner leaves `order`
            try:
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    runners[name].step()
                _sync(device)
                rounds_s[name].append((time.perf_counter() - start) / steps)
            except Exception as err:  # noqa: BLE001
                phase[name] |= _error(err)
                order.remove(name)
    for name, times in rounds_s.items():
        if not times:
            continue
        runner, entry = runners[name], phase[name]
        step_s = statistics.median(times)
        ips = batch_size / step_s
        entry |= {
            "batch_size": batch_size,
            "img_per_s": ips,
            "img_per_s_rounds": [batch_size / t for t in times],
            "step_ms": 1000 * step_s,
            "flops_per_image": runner.flops_per_image,
            "mfu_vs_peak": ips * runner.flops_per_image / ceilings["used"],
            "mfu_vs_measured_matmul": ips * runner.flops_per_image / ceilings["measured_bf16"],
        }
        if compile_:
            entry["compile_s"] = entry["warmup_step_s"][0] - step_s
        if isinstance(runner, TrainerRunner):
            entry["wiring"] = runner.wiring
    if "img_per_s" in phase.get("mae", {}) and "img_per_s" in phase.get("peer", {}):
        phase["mae_vs_peer_speed"] = phase["mae"]["img_per_s"] / phase["peer"]["img_per_s"]
        m, p = phase["mae"]["img_per_s_rounds"], phase["peer"]["img_per_s_rounds"]
        phase["mae_vs_peer_speed_rounds"] = [a / b for a, b in zip(m, p)]
        if phase["mae"].get("peak_memory_mb") and phase["peer"].get("peak_memory_mb"):
            phase["mae_vs_peer_memory"] = phase["mae"]["peak_memory_mb"] / phase["peer"]["peak_memory_mb"]
    for runner in runners.values():
        with contextlib.suppress(Exception):
            runner.close()
    runners.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return phase


# ---------------------------------------------------------------------------------------------------------
# loader alone


def loader_check(dry: bool, batch_size: int, batches: int, budget: Budget) -> dict[str, Any]:
    """The trainer's data path (synthetic source, MAE transforms and masks) alone: img/s over `batches`."""
    from mimkit.data import build_pretrain_data

    workers = 0 if dry else min(8, os.cpu_count() or 1)
    model = mimkit.create_model(_model_name("mae", dry), **_overrides("mae", dry))
    cfg = _train_config(_model_name("mae", dry), {}, batch_size, "cpu", False, "unused", None).data
    cfg.num_samples, cfg.num_workers = batch_size * (batches + 1), workers
    loader, _, _ = build_pretrain_data(cfg, model, seed=0)
    it = iter(loader)
    next(it)  # workers started, first batch
    start, n = time.perf_counter(), 0
    for images, _, _ in it:
        n += images.shape[0]
        if not budget.allows(10):
            break
    seconds = time.perf_counter() - start
    return {
        "num_workers": workers,
        "batch_size": batch_size,
        "images": n,
        "img_per_s": n / max(seconds, 1e-9),
    }


# ---------------------------------------------------------------------------------------------------------
# DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# (report key, method, train.distributed): the trainer's DDP for every method, then FSDP2 for MAE.
DIST_RUNS = (
    ("mae", "mae", "ddp"),
    ("cae", "cae", "ddp"),
    ("convmae", "convmae", "ddp"),
    ("mae_fsdp", "mae", "fsdp"),
)


def _ddp_worker(rank: int, world: int, port: int, dry: bool, batch_size: int, steps: int, out: str) -> None:
    """One rank: each method's trainer (DDP-wrapped by the trainer itself) for a warm-up and `steps` steps on
    this rank's own images, then a checksum of the weights gathered from every rank."""
    sys.stdout = sys.stderr  # the trainer's log lines; the parent prints the JSON
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}  # fmt: skip
    if dry:
        torch.set_num_threads(1)
    import torch.distributed as dist

    device = torch.device("cpu") if dry else torch.device("cuda", rank)
    result: dict[str, Any] = {"rank": rank, "methods": {}}
    runners = []  # closed at the end: closing one ends the process group the others share
    try:
        for key, method, mode in DIST_RUNS:
            entry: dict[str, Any] = {}
            result["methods"][key] = entry
            try:
                where = os.path.join(out, f"{key}{rank}")
                runner = TrainerRunner(method, dry, batch_size, device, False, where, 1e12, distributed=mode)
                runners.append(runner)
                result["backend"] = dist.get_backend()
                entry["ddp_wrapped"] = runner.trainer.ddp is not None
                entry["fsdp_sharded"] = bool(runner.trainer.fsdp)
                gen = torch.Generator().manual_seed(100 + rank)  # each rank its own images
                images = torch.randn(batch_size, *_image_size(runner.trainer.model), generator=gen)
                mask = runner.trainer.model.mask_generator(batch_size, gen)
                runner.batches = itertools.repeat((images, mask, torch.zeros(batch_size, dtype=torch.long)))
                runner.step()  # warm-up
                _sync(device)
                dist.barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    runner.step()
                _sync(device)
                entry["step_s"] = (time.perf_counter() - start) / steps
                full = [
                    p.full_tensor() if hasattr(p, "full_tensor") else p
                    for p in runner.trainer.model.parameters()
                ]
                flat = torch.cat(
                    [p.detach().double().flatten() for p in full]
                )  # FSDP: gathered (a collective)
                checksum = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()]).to(device)
                gathered = [torch.zeros_like(checksum) for _ in range(world)]
                dist.all_gather(gathered, checksum)
                entry["weights_identical_across_ranks"] = all(torch.equal(g, gathered[0]) for g in gathered)
                entry["checksum_max_abs_diff"] = max((g - gathered[0]).abs().max().item() for g in gathered)
            except Exception as err:  # noqa: BLE001
                entry |= _error(err)
                break  # the ranks may disagree on where they are: stop rather than hang in a collective
    finally:
        for runner in runners[::-1]:
            with contextlib.suppress(Exception):
                runner.close()
        with open(os.path.join(out, f"ddp_rank{rank}.json"), "w") as f:
            json.dump(result, f)


def ddp_check(dry: bool, batch_size: int, steps: int, out_dir: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    world = 2
    if not dry and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s) visible; the DDP step needs 2"}
    if not dry and not torch.distributed.is_nccl_available():
        return {"skipped": "this torch build has no NCCL"}
    out = os.path.join(out_dir, "ddp")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    mp.spawn(_ddp_worker, args=(world, _free_port(), dry, batch_size, steps, out), nprocs=world, join=True)
    ranks = [json.load(open(os.path.join(out, f"ddp_rank{r}.json"))) for r in range(world)]
    result: dict[str, Any] = {"world_size": world, "ranks": ranks, "wall_s": time.perf_counter() - start}
    result["backend"] = ranks[0].get("backend")
    for method, _, _ in DIST_RUNS:
        entries = [r["methods"].get(method, {}) for r in ranks]
        if all("step_s" in e for e in entries):
            result[method] = {
                "img_per_s_total": world * batch_size / max(e["step_s"] for e in entries),
                "weights_identical_across_ranks": all(e["weights_identical_across_ranks"] for e in entries),
            }
        else:
            errors = [e["error"] for e in entries if "error" in e]
            result[method] = {"error": errors[0] if errors else "not reached"}
    return result


# ---------------------------------------------------------------------------------------------------------
# main


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "gpu_count": torch.cuda.device_count(),
            "capability": list(torch.cuda.get_device_capability(device)),
            "gpu_memory_gb": props.total_memory / 2**30,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
        }
    return info


def ceilings(device: torch.device, dry: bool) -> dict[str, Any]:
    size = 512 if dry else 8192
    measured = measure_matmul_ceiling(torch.bfloat16, size=size, repeats=3 if dry else 10, device=device)
    entry, peak = table_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else (None, None)
    return {
        "measured_bf16": measured,
        "measured_bf16_tflops": measured / 1e12,
        "matmul_size": size,
        "table_entry": entry,
        "table_bf16_tflops": peak / 1e12 if peak else None,
        "used": peak or measured,
        "used_source": "table (dense bf16 data-sheet peak)" if peak else "measured bf16 matmul ceiling",
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the check; the JSON report goes to stdout (and `--out`), every other line to stderr."""
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines
        report = _run(argv)
    text = json.dumps(report, indent=2, default=str)
    print(text, file=stdout, flush=True)
    if report["settings"].get("out"):
        Path(report["settings"]["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(report["settings"]["out"]).write_text(text + "\n")
    return report


def _run(argv: list[str] | None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, a few steps (CI)")
    p.add_argument("--batch-size", type=int, default=128, help="train-step batch (128-256 on a GPU)")
    p.add_argument("--parity-batch", type=int, default=4)
    p.add_argument("--tol", type=float, default=1e-4, help="parity tolerance (relative)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per runner per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile phase")
    p.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="wall-clock budget; sections that would not fit are skipped",
    )
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    started = time.perf_counter()
    dry = args.dry_run
    if dry:
        device = torch.device("cpu")
        args.batch_size, args.parity_batch = min(args.batch_size, 8), min(args.parity_batch, 2)
        args.rounds, args.steps, args.warmup = min(args.rounds, 2), min(args.steps, 1), 1
    elif not torch.cuda.is_available():
        print("no CUDA device is visible; use --dry-run for the CPU check", file=sys.stderr)
        raise SystemExit(2)
    else:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {"schema": SCHEMA, "dry_run": dry, "settings": vars(args).copy()}
    report["machine"] = machine(device)
    report["ceiling"] = ceil = ceilings(device, dry)
    report["parity"] = {}
    for method in METHODS:
        try:
            report["parity"][method] = parity(method, device, dry, args.parity_batch, args.tol)
        except Exception as err:  # noqa: BLE001
            report["parity"][method] = _error(err) | {"pass": False}
    report["parity_pass"] = all(r.get("pass") for r in report["parity"].values())

    if not dry and not args.no_compile:
        from torch import _dynamo

        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)  # 4 models compiled
    with tempfile.TemporaryDirectory(prefix="mimkit_gpu_check_") as tmp:
        report["train"] = {}
        for compile_ in (False, True):
            key = "compile" if compile_ else "eager"
            if compile_ and (args.no_compile or dry):
                report["train"][key] = {
                    "skipped": "--no-compile"
                    if args.no_compile
                    else "dry run (compiling takes minutes on a CPU)"
                }
                continue
            try:
                report["train"][key] = train_phase(dry, device, args.batch_size, compile_, args.rounds, args.steps,
                                                   args.warmup, ceil, budget, tmp)  # fmt: skip
            except Exception as err:  # noqa: BLE001
                report["train"][key] = _error(err)
        try:
            report["loader"] = (
                loader_check(dry, min(args.batch_size, 64), 2 if dry else 6, budget)
                if budget.allows(40)
                else {"skipped": "time budget"}
            )
        except Exception as err:  # noqa: BLE001
            report["loader"] = _error(err)
        try:
            report["ddp"] = ddp_check(dry, min(args.batch_size, 4) if dry else args.batch_size, 2 if dry else 10, tmp) \
                if budget.allows(60 if not dry else 0) else {"skipped": "time budget"}  # fmt: skip
        except Exception as err:  # noqa: BLE001
            report["ddp"] = _error(err)
    report["anchors"] = {
        "official_mae_vit_l_img_per_s_per_v100": 106,
        "dailymae_mae_b_img_per_s_per_a100": 2000,
        "target_mfu_bf16_vit_b_mae": 0.5,
    }
    report["wall_s"] = time.perf_counter() - started
    return report


if __name__ == "__main__":
    main()
