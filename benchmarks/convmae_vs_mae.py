"""Train-step time and memory: ConvMAE-B (visible-only stages 1-2, and the authors' dense masked stages) vs
MAE-B, in one process, alternating, medians. Prints one JSON object.

    python benchmarks/convmae_vs_mae.py --batch-size 16 --rounds 5 --precision fp32 bf16

Each round runs one timed AdamW train step (forward, backward, optimizer) of every model in turn, in a
rotated order, after one warm-up step each; the same images and a fixed mask per model. Memory: the peak of
Python-visible allocations would miss ATen's buffers, so the peak resident set is sampled instead: a
background thread polls /proc/self/statm every millisecond during the step, and the figure is the peak
minus the RSS just before the step (model, gradients and optimizer state already allocated), i.e. the
activations and temporaries the step itself needs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from peak_rss import PeakRSS

import mimkit


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # A fixed mmap threshold turns off glibc's dynamic one, so every large tensor is mmapped and returned
        # to the OS when freed: the resident set then tracks live tensor memory step by step.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "mae_b": mimkit.create_model("mae_vit_base_patch16_224", img_size=args.img_size),
        "convmae_b": mimkit.create_model("convmae_base_patch16_224", img_size=args.img_size),
        "convmae_b_dense": mimkit.create_model(
            "convmae_base_patch16_224", img_size=args.img_size, skip_masked=False
        ),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    masks = {
        k: m.mask_generator(args.batch_size, torch.Generator().manual_seed(1)) for k, m in models.items()
    }
    result = {"batch_size": args.batch_size, "img_size": args.img_size, "threads": torch.get_num_threads()}

    def step(name: str, bf16: bool) -> tuple[float, int]:
        model, opt = models[name], opts[name]
        with PeakRSS() as mem:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(images, masks[name]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            elapsed = time.perf_counter() - start
        return elapsed, mem.delta

    names = list(models)
    for precision in args.precision:
        bf16 = precision == "bf16"
        for name in names:  # warm-up (also allocates gradients and AdamW state)
            step(name, bf16)
        times: dict[str, list[float]] = {n: [] for n in names}
        mems: dict[str, list[int]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                t, m = step(name, bf16)
                times[name].append(t)
                mems[name].append(m)
        med = {n: statistics.median(times[n]) for n in names}
        mem = {n: statistics.median(mems[n]) / 2**20 for n in names}
        result[precision] = {
            "step_s_median": med,
            "img_per_s": {n: args.batch_size / med[n] for n in names},
            "step_peak_rss_delta_mb_median": mem,
            "time_ratio_vs_mae": {n: med[n] / med["mae_b"] for n in names},
            "mem_ratio_vs_mae": {n: mem[n] / mem["mae_b"] for n in names},
            "step_s_all": times,
        }
        print(json.dumps({precision: result[precision]["step_s_median"]}), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
