"""Does bf16 autocast training track fp32? Each tiny preset on Fashion-MNIST, both precisions, same seed.

    python benchmarks/bf16_numerics.py                              # every tiny preset, 300 steps each
    python benchmarks/bf16_numerics.py --models mae_vit_tiny_patch4_32 --steps 600 --out runs/bf16

Both runs of a preset see the same initial weights, batches and masks (the trainer's seeding), so the loss
curves differ only by precision. Reported per preset: the loss every step of both runs, the largest and the
mean absolute gap of the curves smoothed over `--window` steps, the gap of the final window's mean loss
(relative to fp32), non-finite losses (none allowed), and the dtypes of the master weights and AdamW state
after bf16 training (they must stay fp32). Writes bf16_numerics.json and bf16_numerics.png (the curves).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from mimkit import list_models
from mimkit.commands.bench import machine_record


def train(name: str, precision: str, args: argparse.Namespace, out_dir: Path) -> dict:
    from mimkit.engine.config import config_from_dict
    from mimkit.engine.trainer import Trainer

    cfg = config_from_dict(
        {
            "model": {"name": name, "in_chans": 1},
            "data": {"source": "fashion_mnist", "batch_size": args.batch_size, "num_workers": 0},
            "optim": {"base_lr": args.base_lr, "warmup_steps": args.steps // 10},
            "train": {"max_steps": args.steps, "precision": precision, "output_dir": str(out_dir),
                      "progress": False, "seed": args.seed},
        }
    )  # fmt: skip
    trainer = Trainer(cfg)
    try:
        batches, losses = trainer.batches(), []
        start = time.perf_counter()
        while trainer.step < trainer.total_steps:
            losses.append(trainer.train_step(batches)["loss"])
        seconds = time.perf_counter() - start
        dtypes = {str(p.dtype) for p in trainer.model.parameters()}
        state_dtypes = {
            str(v.dtype)
            for s in trainer.optimizer.state.values()
            for k, v in s.items()
            if torch.is_tensor(v) and k != "step"
        }
    finally:
        trainer.close()
    return {
        "loss": losses,
        "img_per_s": args.steps * args.batch_size / seconds,
        "param_dtypes": sorted(dtypes),
        "adamw_state_dtypes": sorted(state_dtypes),
    }


def smooth(xs: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` steps (shorter at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def compare(fp32: list[float], bf16: list[float], window: int) -> dict:
    s32, s16 = smooth(fp32, window), smooth(bf16, window)
    gaps = [abs(a - b) for a, b in zip(s32, s16)]
    end32, end16 = statistics.fmean(fp32[-window:]), statistics.fmean(bf16[-window:])
    return {
        "max_abs_gap_smoothed": max(gaps),
        "mean_abs_gap_smoothed": statistics.fmean(gaps),
        "final_loss_fp32": end32,
        "final_loss_bf16": end16,
        "final_rel_gap": (end16 - end32) / end32,
        "non_finite_losses": sum(not math.isfinite(x) for x in fp32 + bf16),
    }


def plot(results: dict, window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), dpi=120, squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results[name]
        for precision, style in (("fp32", "-"), ("bf16", "--")):
            ax.plot(smooth(r[precision]["loss"], window), style, label=precision)
        ax.set_title(f"{name}\nfinal gap {100 * r['gap']['final_rel_gap']:+.2f}%", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss ({window}-step mean)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="presets (default: every *_tiny_* preset registered)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--base-lr", type=float, default=1.5e-3)
    p.add_argument("--window", type=int, default=20, help="steps averaged when comparing the curves")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="runs/bf16_numerics")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models or list_models("*_tiny_*"):
        r = {prec: train(name, prec, args, out / f"{name}_{prec}") for prec in ("fp32", "bf16")}
        r["gap"] = compare(r["fp32"]["loss"], r["bf16"]["loss"], args.window)
        results[name] = r
        g = r["gap"]
        print(f"[bf16] {name}: final loss fp32 {g['final_loss_fp32']:.4f} bf16 {g['final_loss_bf16']:.4f} "
              f"({100 * g['final_rel_gap']:+.2f}%), max smoothed gap {g['max_abs_gap_smoothed']:.4f}, "
              f"{g['non_finite_losses']} non-finite; bf16 weights {r['bf16']['param_dtypes']}, AdamW state "
              f"{r['bf16']['adamw_state_dtypes']}; {r['fp32']['img_per_s']:.0f} / {r['bf16']['img_per_s']:.0f} "
              "img/s fp32 / bf16", flush=True)  # fmt: skip
    report = {"settings": {**vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "machine": machine_record(), "results": results}  # fmt: skip
    (out / "bf16_numerics.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, args.window, out / "bf16_numerics.png")
    print(f"[bf16] wrote {out / 'bf16_numerics.json'} and {out / 'bf16_numerics.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
