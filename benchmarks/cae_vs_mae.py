"""Train-step throughput and efficiency: CAE-B (block mask 50%, momentum 0) vs MAE-B (random mask 75%), in
one process, alternating (ABBA), medians. Prints one JSON object.

    python benchmarks/cae_vs_mae.py                                        # bs 16, 5 rounds, fp32 + bf16, 1 thread
    python benchmarks/cae_vs_mae.py --threads 1 2 --precision bf16 fp32 --rounds 5 --out results.json
    python benchmarks/cae_vs_mae.py --batch-size 4 --rounds 2 --precision bf16          # quick

A CAE-B step does more work than an MAE-B step (encoder on 98 visible patches instead of 49, a no-grad
encoder pass over the 98 masked patches for the alignment target, a 4-block cross-attention regressor and a
4-block 768-wide decoder on 98 tokens), so time is not the comparison; efficiency is: MFU = achieved model
FLOP/s over the measured matmul ceiling. The ceiling cancels in the CAE/MAE MFU ratio, which is therefore
also given per round (paired steps, so load drifts on a shared machine hit both alike) and as the median of
those per-round ratios.

How it measures, per thread count x precision: one warm-up step per model (allocates gradients and AdamW
state), then `--rounds` rounds; round r times one train step (forward under autocast for bf16, backward,
AdamW step, zero_grad) of each model, in the order CAE, MAE on even rounds and MAE, CAE on odd rounds, so
consecutive rounds form ABBA blocks. Same images and a fixed mask per model throughout. Memory: the peak
resident set during the step minus the RSS just before it (model, gradients and AdamW state already
there), sampled every millisecond from /proc/self/statm by a background thread: the activations and
temporaries the step needs (glibc's mmap threshold is fixed so freed tensors go back to the OS). Each
step's CPU time (process user + sys, less the memory poller's) is recorded too: on a machine shared with
other jobs, wall time includes time spent descheduled, CPU time mostly does not, so the CPU-time efficiency
ratio (model FLOPs per CPU second, CAE over MAE) is the steadier comparison at 1 thread.

FLOPs per image per step come from `mimkit.engine.perf.model_flops_per_image` (analytic for MAE; a
FlopCounterMode count of a real batch-1 step for CAE), cross-checked against an analytic CAE count below.
The "second copy" check: CAE's parameters and buffers are exactly those of encoder + regressor + decoder,
there is no `teacher` module and no state-dict key outside those parts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
from peak_rss import PeakRSS
from torch import nn

import mimkit
from mimkit.engine.perf import measure_matmul_ceiling, mfu, model_flops_per_image
from mimkit.layers.attention import set_fused_attention

NAMES = ("cae_b", "mae_b")


# ---------------------------------------------------------------------------------------------------------
# Analytic CAE count (cross-check of the FlopCounterMode figure)


def _block_fwd(tokens: int, dim: int, hidden: int) -> int:
    """Forward matmul FLOPs of one self-attention block on `tokens` tokens (one image)."""
    return 2 * tokens * dim * (4 * dim + 2 * hidden) + 4 * tokens * tokens * dim


def cae_flops_breakdown(model: nn.Module) -> dict[str, int]:
    """Matmul FLOPs per image of one CAE train step, by part (2 FLOPs per multiply-add).

    Trained parts count 3x forward (forward, input gradient, weight gradient); the patch embedding 2x (its
    input is the image); the alignment-target encoder pass runs under no_grad: 1x forward.
    """
    c = model.config
    gh, gw = model.grid_size
    L = gh * gw
    M = int(model.mask_generator(1).sum())  # masked patches per image
    V = L - M
    D, hid = c.embed_dim, int(c.embed_dim * c.mlp_ratio)
    Dd = c.decoder_embed_dim or D
    hid_d = int(Dd * c.mlp_ratio)
    P = c.patch_size**2 * c.in_chans
    K = model.decoder_pred.out_features
    patch_embed = 2 * L * P * D  # conv over every patch, before the visible/masked gather
    encoder = c.depth * _block_fwd(1 + V, D, hid)
    target = patch_embed + c.depth * _block_fwd(1 + M, D, hid)
    nk = 1 + V + M  # keys/values: class token + visible latents + current queries
    regressor = c.regressor_depth * (
        2 * M * D * D * 2  # q, proj
        + 2 * nk * D * D * 2  # k, v
        + 4 * M * nk * D  # q k^T, scores v
        + 2 * M * D * hid * 2  # fc1, fc2
    )
    decoder = (2 * M * D * Dd if Dd != D else 0) + c.decoder_depth * _block_fwd(M, Dd, hid_d) + 2 * M * Dd * K
    return {
        "patch_embed_train": 2 * patch_embed,
        "encoder_visible_train": 3 * encoder,
        "encoder_target_no_grad": target,
        "regressor_train": 3 * regressor,
        "decoder_train": 3 * decoder,
    }


# ---------------------------------------------------------------------------------------------------------
# No second copy of the encoder at momentum 0


def _numel(tensors: Any) -> int:
    return sum(t.numel() for t in tensors)


def second_copy_check(cae: nn.Module) -> dict[str, Any]:
    """Parameters + buffers of CAE vs encoder + regressor + decoder; `teacher` must be absent."""
    parts = {
        "encoder": [cae.encoder],
        "regressor": [cae.regressor_blocks, cae.regressor_norm],
        "decoder": [cae.decoder_embed, cae.decoder_blocks, cae.decoder_norm, cae.decoder_pred],
    }
    counts = {
        k: _numel(p for m in mods for p in m.parameters()) + _numel(b for m in mods for b in m.buffers())
        for k, mods in parts.items()
    }
    counts["regressor"] += cae.mask_token.numel()
    counts["decoder"] += cae.decoder_pos_embed.numel()
    total = _numel(cae.parameters()) + _numel(cae.buffers())  # shared tensors counted once by torch
    prefixes = ("encoder.", "regressor_", "mask_token", "decoder_")
    stray = [k for k in cae.state_dict() if not k.startswith(prefixes)]
    storages = {t.untyped_storage().data_ptr() for t in cae.state_dict().values()}
    ok = (
        getattr(cae, "teacher", None) is None
        and total == sum(counts.values())
        and not stray
        and len(storages) == len(cae.state_dict())
    )
    return {
        "momentum": cae.config.momentum,
        "has_teacher": getattr(cae, "teacher", None) is not None,
        "params_plus_buffers_cae": total,
        "params_plus_buffers_parts": counts,
        "params_plus_buffers_parts_sum": sum(counts.values()),
        "state_dict_keys_outside_parts": stray,
        "distinct_storages_equal_state_dict_entries": len(storages) == len(cae.state_dict()),
        "encoder_copy_would_cost_mb_fp32": counts["encoder"] * 4 / 2**20,
        "no_second_encoder_copy": ok,
    }


# ---------------------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # A fixed mmap threshold turns off glibc's dynamic one, so every large tensor is mmapped and returned
        # to the OS when freed: the resident set then tracks live tensor memory step by step.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each model per round)")
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts to run, in turn")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.rounds < 1 or args.batch_size < 1:
        ap.error("--rounds and --batch-size must be at least 1")

    torch.manual_seed(0)
    models = {
        "cae_b": mimkit.create_model("cae_vit_base_patch16_224"),
        "mae_b": mimkit.create_model("mae_vit_base_patch16_224"),
    }
    cae = models["cae_b"]
    if (cae.config.mask_kind, cae.config.mask_ratio, cae.config.momentum) != ("block", 0.5, 0.0):
        raise SystemExit(f"unexpected CAE-B preset {cae.config}; the benchmark is for block 50%, momentum 0")
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    images = torch.randn(args.batch_size, 3, 224, 224)
    masks = {
        k: m.mask_generator(args.batch_size, torch.Generator().manual_seed(1)) for k, m in models.items()
    }

    torch.set_num_threads(max(args.threads))
    # Count CAE through the exact attention path (as the MAE analytic count assumes): FlopCounterMode books
    # the CPU flash kernel's backward at 2.5x forward (it recomputes the scores), the model's FLOPs are 2x.
    set_fused_attention(cae, False)
    flops = {k: model_flops_per_image(m) for k, m in models.items()}
    set_fused_attention(cae, True)
    breakdown = cae_flops_breakdown(cae)
    result: dict[str, Any] = {
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "mask": {
            k: {"kind": m.config.mask_kind, "masked_per_image": int(masks[k][0].sum())}
            for k, m in models.items()
        },
        "flops_per_image_step": flops,
        "gflops_per_image_step": {k: v / 1e9 for k, v in flops.items()},
        "flops_ratio_cae_over_mae": flops["cae_b"] / flops["mae_b"],
        "cae_flops_analytic_breakdown_gflops": {k: v / 1e9 for k, v in breakdown.items()},
        "cae_flops_analytic_total_over_counted": sum(breakdown.values()) / flops["cae_b"],
        "second_copy_check": second_copy_check(cae),
        "runs": {},
    }
    print(
        json.dumps({k: result[k] for k in ("gflops_per_image_step", "flops_ratio_cae_over_mae")}), flush=True
    )

    def step(name: str, bf16: bool) -> tuple[float, float, int]:
        """One train step -> (wall s, CPU s of the step's own threads, peak RSS growth in bytes)."""
        model, opt = models[name], opts[name]
        with PeakRSS() as mem:
            cpu_start, start = time.process_time(), time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(images, masks[name]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
        return elapsed, cpu - mem.cpu_s, mem.delta

    for threads in args.threads:
        torch.set_num_threads(threads)
        for precision in args.precision:
            bf16 = precision == "bf16"
            dtype = torch.bfloat16 if bf16 else torch.float32
            load_start = load_average()
            ceiling_start = measure_matmul_ceiling(dtype)
            for name in NAMES:  # warm-up (also allocates gradients and AdamW state)
                step(name, bf16)
            times: dict[str, list[float]] = {n: [] for n in NAMES}
            cpus: dict[str, list[float]] = {n: [] for n in NAMES}
            mems: dict[str, list[int]] = {n: [] for n in NAMES}
            for r in range(args.rounds):
                order = NAMES if r % 2 == 0 else NAMES[::-1]  # CAE MAE | MAE CAE | CAE MAE | ...
                for name in order:
                    t, c, m = step(name, bf16)
                    times[name].append(t)
                    cpus[name].append(c)
                    mems[name].append(m)
            ceiling_end = measure_matmul_ceiling(dtype)
            ceiling = max(ceiling_start, ceiling_end)
            med = {n: statistics.median(times[n]) for n in NAMES}
            ips = {n: args.batch_size / med[n] for n in NAMES}
            mfus = {n: mfu(ips[n], flops[n], ceiling) for n in NAMES}
            # Per-round paired MFU ratio: (F_cae / t_cae) / (F_mae / t_mae); the ceiling cancels.
            ratios = [
                (flops["cae_b"] / tc) / (flops["mae_b"] / tm)
                for tc, tm in zip(times["cae_b"], times["mae_b"])
            ]
            cpu_med = {n: statistics.median(cpus[n]) for n in NAMES}
            cpu_ratios = [
                (flops["cae_b"] / c) / (flops["mae_b"] / m) for c, m in zip(cpus["cae_b"], cpus["mae_b"])
            ]
            run = {
                "threads": threads,
                "precision": precision,
                "load_average_start": load_start,
                "load_average_end": load_average(),
                "matmul_ceiling_gflops_start": ceiling_start / 1e9,
                "matmul_ceiling_gflops_end": ceiling_end / 1e9,
                "step_s_median": med,
                "img_per_s": ips,
                "achieved_gflops_per_s": {n: ips[n] * flops[n] / 1e9 for n in NAMES},
                "mfu": mfus,
                "mfu_ratio_cae_over_mae": mfus["cae_b"] / mfus["mae_b"],
                "mfu_ratio_cae_over_mae_median_of_rounds": statistics.median(ratios),
                "mfu_ratio_cae_over_mae_rounds": ratios,
                "time_ratio_cae_over_mae": med["cae_b"] / med["mae_b"],
                # CPU time of the step (user + sys of the process, less the RSS poller): what the step cost
                # when it ran, insensitive to time spent descheduled on a loaded machine. With 2+ threads it
                # also counts OpenMP spin-waiting, so it is most telling at 1 thread.
                "step_cpu_s_median": cpu_med,
                "model_gflops_per_cpu_s": {n: args.batch_size * flops[n] / cpu_med[n] / 1e9 for n in NAMES},
                "cpu_time_efficiency_ratio_cae_over_mae": (flops["cae_b"] / cpu_med["cae_b"])
                / (flops["mae_b"] / cpu_med["mae_b"]),
                "cpu_time_efficiency_ratio_cae_over_mae_median_of_rounds": statistics.median(cpu_ratios),
                "step_peak_rss_delta_mb_median": {n: statistics.median(mems[n]) / 2**20 for n in NAMES},
                "step_s_all": times,
                "step_cpu_s_all": cpus,
            }
            key = f"threads{threads}_{precision}"
            result["runs"][key] = run
            print(
                json.dumps(
                    {
                        key: {
                            k: run[k]
                            for k in (
                                "img_per_s",
                                "mfu",
                                "mfu_ratio_cae_over_mae",
                                "cpu_time_efficiency_ratio_cae_over_mae",
                            )
                        }
                    }
                ),
                flush=True,
            )
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
