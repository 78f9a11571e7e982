"""Quality per CPU budget on Fashion-MNIST: pretrain each method's tiny preset for a fixed number of minutes,
then kNN, linear and attentive probes, against raw pixels and the same encoder at random init.

    python benchmarks/quality.py --minutes 20                       # every *_tiny_* preset
    python benchmarks/quality.py --minutes 3 --models mae_vit_tiny_patch4_32 --max-train 5000 --max-test 2000

Pretraining sees the Fashion-MNIST train split without labels (the trainer of mimkit.engine, the
method's recipe in configs/*_tiny_fmnist.yaml for model, batch and optimizer, a 5% warmup and a cosine
schedule fitted to the step count the budget allows).
Probes train on labelled features of a seeded subset of the train split (--max-train) and report top-1
on a seeded subset of the test split (--max-test). Writes into --out: quality.json, quality.md (the
table) and quality.png (bar chart); pretraining runs and the feature cache stay in --out for re-use.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mimkit import list_models, model_config
from mimkit.eval.attentive import AttentiveProbeConfig
from mimkit.eval.features import cache_key
from mimkit.eval.knn import knn_classify
from mimkit.eval.linear import LinearProbeConfig, train_linear_probe
from mimkit.eval.pipeline import DataSpec, eval_datasets, load_eval_model, run_probe

PROTOCOLS = ("knn", "linear", "attentive")


RECIPES = Path(__file__).resolve().parent.parent / "configs"


def recipe(name: str) -> dict:
    """The method's CPU recipe: the `configs/*_tiny_fmnist.yaml` whose model is `name` (pixel targets), else {}."""
    from mimkit.engine.config import parse_yaml

    for path in sorted(RECIPES.glob("*_tiny_fmnist.yaml")):
        d = parse_yaml(path.read_text()) or {}
        if d.get("model", {}).get("name") == name:
            return d
    return {}


def pretrain(
    name: str, minutes: float, out_dir: Path, args: argparse.Namespace, model_overrides: dict | None = None
) -> dict:
    """Pretrain `name` on the unlabelled train split for `minutes` of `args.clock` time; returns run facts.

    Model, batch size and optimizer come from the method's recipe (`recipe`); --batch-size and --base-lr
    override them, `model_overrides` (e.g. {"mask_ratio": 0.9}, benchmarks/ablations.py) the model's fields;
    the schedule (5% warmup, then cosine) is refitted to the steps the budget allows."""
    from mimkit.engine.config import config_from_dict
    from mimkit.engine.trainer import Trainer

    base = recipe(name)
    base = {**base, "model": {**base.get("model", {}), **(model_overrides or {})}}
    overrides = {"in_chans": 1} if "in_chans" in {f for f in model_config(name).__dataclass_fields__} else {}
    optim = {k: v for k, v in base.get("optim", {}).items() if k not in ("warmup_epochs", "warmup_steps")}
    optim |= {"warmup_steps": 100}  # refitted below
    if args.base_lr is not None:
        optim |= {"base_lr": args.base_lr, "lr": None}
    optim.setdefault("base_lr", 1.5e-3)
    batch_size = args.batch_size or base.get("data", {}).get("batch_size", 64)
    cfg = config_from_dict(
        {
            "model": {**overrides, **base.get("model", {}), "name": name},
            "data": {"source": "fashion_mnist", "split": "train", "batch_size": batch_size,
                     "num_workers": args.num_workers},
            "optim": optim,
            "train": {"max_steps": 10**9, "precision": args.precision, "output_dir": str(out_dir),
                      "progress": False, "ckpt_every": 10**9, "log_every": 10**9, "seed": args.seed},
        }
    )  # fmt: skip
    trainer = Trainer(cfg)
    try:
        batches = trainer.batches()
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        start, wall_start = clock(), time.perf_counter()
        budget = 60.0 * minutes
        # The cosine schedule needs its length in advance: time the steps of the first 3% of the budget
        # (after one warm-up step; the provisional 100-step warmup keeps them at a low lr), fit the schedule
        # (5% warmup, then cosine) to the steps the budget allows, and fit it again at 25%, 50% and 75% of the
        # budget from the steps since the last fit: one short calibration misjudged a run by up to 2x when
        # the machine's load changed.
        losses = [trainer.train_step(batches)["loss"]]
        if getattr(args, "steps", 0):  # a fixed step count (e.g. to match an earlier run): no budget fitting
            budget = float("inf")
            total = trainer.total_steps = args.steps
            trainer.warmup_steps = max(1, total // 20)
        for fraction in (0.03, 0.25, 0.5, 0.75) if not getattr(args, "steps", 0) else ():
            t0, s0 = clock(), trainer.step
            while trainer.step - s0 < 3 or clock() - start < fraction * budget:
                losses.append(trainer.train_step(batches)["loss"])
            per_step = (clock() - t0) / (trainer.step - s0)
            total = max(10, trainer.step + int((budget - (clock() - start)) / per_step))
            trainer.total_steps, trainer.warmup_steps = total, max(1, total // 20)
        while trainer.step < trainer.total_steps and clock() - start < budget:
            losses.append(trainer.train_step(batches)["loss"])
        seconds, wall = clock() - start, time.perf_counter() - wall_start
        path = trainer.save()
    finally:
        trainer.close()
    facts = {
        "checkpoint": str(path),
        "steps": trainer.step,
        "planned_steps": total,
        "images_seen": trainer.step * trainer.global_batch,
        "epochs": trainer.step * trainer.global_batch / len(trainer.dataset),
        "seconds": seconds,
        "clock": args.clock,
        "wall_seconds": wall,
        "loss_first": losses[0],
        "loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "peak_lr": trainer.peak_lr,
        "batch_size": batch_size,
        "model": {k: v for k, v in base.get("model", {}).items() if k not in ("name", "in_chans")},
        "optim": {k: v for k, v in optim.items() if k != "warmup_steps"},
    }
    print(f"[quality] {name}: {facts['steps']} steps ({facts['epochs']:.2f} epochs) in {seconds:.0f} {args.clock} s ({wall:.0f} s wall), "
          f"loss {facts['loss_first']:.4f} -> {facts['loss_last']:.4f}", flush=True)  # fmt: skip
    return facts


def stack_pixels(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset of (image [C, H, W], label) -> (pixels [N, C*H*W], labels [N])."""
    loader = torch.utils.data.DataLoader(ds, batch_size=512)
    xs, ys = zip(*[(x.flatten(1), torch.as_tensor(y)) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def pixel_baselines(spec: DataSpec, reference_model, args: argparse.Namespace) -> dict:
    """kNN and a linear probe (multinomial logistic regression on standardised pixels) on raw pixels."""
    train, test, names, num_classes = eval_datasets(reference_model, spec)
    (x, y), (xt, yt) = stack_pixels(train), stack_pixels(test)
    acc_knn, _ = knn_classify(x, y, xt, yt, k=20, temperature=0.07, num_classes=num_classes)
    lin = train_linear_probe(
        x, y, xt, yt, num_classes, LinearProbeConfig(epochs=args.linear_epochs, seed=args.seed)
    )
    return {
        "knn": acc_knn,
        "linear": lin.accuracy,
        "linear_best_base_lr": lin.best_base_lr,
        "dims": x.shape[1],
    }


def evaluate(
    checkpoint: str, random_init: bool, spec: DataSpec, cache: Path, args: argparse.Namespace
) -> dict:
    model, key = load_eval_model(checkpoint, "" if random_init else None, seed=args.seed)
    # a seeded random init gives the same figures every run: keep them beside the feature cache
    settings = {k: getattr(args, k) for k in ("linear_epochs", "attentive_epochs", "bf16_features", "seed")}
    # attentive_follows_bf16: since the attentive probe runs in bf16 with bf16 features; older files not reused
    settings |= {
        "model": key,
        "data": asdict(spec),
        "torch": torch.__version__,
        "attentive_follows_bf16": True,
    }
    saved = cache / f"random-init-{cache_key(**settings)}.json"
    if random_init and saved.is_file():
        out = json.loads(saved.read_text())
        print(f"[quality]   random init: re-using {saved.name}: " + ", ".join(
            f"{k} {100 * out[k]:.2f}%" for k in PROTOCOLS), flush=True)  # fmt: skip
        return out
    out = {}
    for protocol in ("attentive", "knn", "linear"):  # attentive first: its token cache serves the other two
        res = run_probe(
            protocol, model, spec, key, cache, bf16=args.bf16_features, progress=False,
            linear=LinearProbeConfig(epochs=args.linear_epochs, seed=args.seed),
            attentive=AttentiveProbeConfig(epochs=args.attentive_epochs, seed=args.seed),
        )  # fmt: skip
        out[protocol] = res["accuracy"]
        if protocol == "linear":
            out["linear_best_base_lr"] = res["best_base_lr"]
        print(f"[quality]   {'random init' if random_init else 'pretrained'} {protocol}: {100 * res['accuracy']:.2f}% "
              f"({res['seconds']:.0f} s)", flush=True)  # fmt: skip
    if random_init:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(out) + "\n")
    return out


def table(results: dict) -> str:
    rows = ["| encoder | pretraining | kNN | linear | attentive |", "|---|---|---|---|---|"]

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    px = results["pixels"]
    rows.append(f"| raw pixels ({px['dims']} dims) | none | {pct(px['knn'])} | {pct(px['linear'])} | — |")
    for name, r in results["models"].items():
        p = r["pretrain"]
        name += "".join(f", {k}={v}" for k, v in p.get("model", {}).items())  # the recipe's changes
        rows.append(
            f"| {name} | random init | " + " | ".join(pct(r["random_init"].get(k)) for k in PROTOCOLS) + " |"
        )
        rows.append(
            f"| {name} | {p['seconds'] / 60:.1f} {p.get('clock', 'wall')}-min, {p['steps']} steps of "
            f"{p.get('batch_size', '?')} ({p['epochs']:.2f} ep), peak lr {p['peak_lr']:.2g} | "
            + " | ".join(pct(r["pretrained"].get(k)) for k in PROTOCOLS)
            + " |"
        )
    return "\n".join(rows) + "\n"


def bar_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour per method: random init light and hatched, pretrained dark; raw pixels grey
    series = [("raw pixels", results["pixels"], "0.55", "")]
    for i, (name, r) in enumerate(results["models"].items()):
        dark, light = plt.cm.tab20(2 * i), plt.cm.tab20(2 * i + 1)
        short = name.split("_")[0]
        series += [(f"{short} random init", r["random_init"], light, "//"),
                   (f"{short} pretrained", r["pretrained"], dark, "")]  # fmt: skip
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9.5, 4), dpi=120)
    shown = []
    for i, (label, vals, color, hatch) in enumerate(series):
        done = [(j, 100 * vals[p]) for j, p in enumerate(PROTOCOLS) if vals.get(p) is not None]
        shown += [v for _, v in done]
        bars = ax.bar([j + i * width for j, _ in done], [v for _, v in done], width, label=label,
                      color=color, hatch=hatch, edgecolor="white", linewidth=0)  # fmt: skip
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(PROTOCOLS))], PROTOCOLS)
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    s = results["settings"]
    ax.set_title(
        f"{s['minutes']:g} {s['clock']}-minutes of pretraining per method; probes on {s['max_train']} train / "
        f"{s['max_test']} test images",
        fontsize=9,
    )
    ax.set_ylim(max(0, 10 * (min(shown) // 10) - 10), min(100, max(shown) + 5))  # the differences
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--minutes", type=float, default=20.0, help="pretraining budget per method, in --clock minutes"
    )
    p.add_argument(
        "--steps", type=int, default=0, help="pretrain exactly this many steps instead of fitting --minutes"
    )
    p.add_argument(
        "--clock",
        default="cpu",
        choices=["cpu", "wall"],
        help="cpu: this process's CPU time over all its threads (fair on a shared machine); wall: elapsed time",
    )
    p.add_argument("--models", nargs="+", help="presets (default: every *_tiny_* preset registered)")
    p.add_argument("--out", default="runs/quality")
    p.add_argument(
        "--max-train", type=int, default=10000, help="labelled train images for probes / kNN memory"
    )
    p.add_argument("--max-test", type=int, default=10000, help="test images evaluated")
    p.add_argument("--batch-size", type=int, default=None, help="pretraining batch (default: the recipe's)")
    p.add_argument("--base-lr", type=float, default=None, help="pretraining base lr (default: the recipe's)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--num-workers", type=int, default=0, help="0: data loading counts in the CPU budget")
    p.add_argument("--linear-epochs", type=int, default=30)
    p.add_argument("--attentive-epochs", type=int, default=10)
    p.add_argument("--bf16-features", action="store_true", help="extract probe features under bf16 autocast")
    p.add_argument("--reuse", action="store_true", help="re-use a finished pretraining run found in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--replot", action="store_true", help="only rewrite quality.md / quality.png from quality.json"
    )
    args = p.parse_args(argv)
    if args.replot:
        results = json.loads((Path(args.out) / "quality.json").read_text())
        (Path(args.out) / "quality.md").write_text(table(results))
        bar_chart(results, Path(args.out) / "quality.png")
        print(table(results))
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = args.models or list_models("*_tiny_*")
    spec = DataSpec("fashion_mnist", max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    cache = out / "feature_cache"
    results_path = out / "quality.json"
    results = (
        json.loads(results_path.read_text()) if args.reuse and results_path.is_file() else {"models": {}}
    )
    results["settings"] = {**vars(args), "models": models, "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "machine": f"{platform.machine()} {platform.processor()}".strip(), "python": sys.version.split()[0]}  # fmt: skip

    for name in models:
        run_dir = out / name
        prev = results["models"].get(name, {})
        try:
            if args.reuse and (run_dir / "checkpoint.pt").is_file() and "pretrain" in prev:
                facts = prev["pretrain"]
                print(f"[quality] {name}: re-using {run_dir / 'checkpoint.pt'}")
            else:
                facts = pretrain(name, args.minutes, run_dir, args)
            entry = {"pretrain": facts}
            for random_init in (False, True):
                which = "random_init" if random_init else "pretrained"
                entry[which] = evaluate(facts["checkpoint"], random_init, spec, cache, args)
        except Exception as err:  # one broken method must not lose the others' figures
            print(f"[quality] {name} failed: {type(err).__name__}: {err}", flush=True)
            results.setdefault("failed", {})[name] = f"{type(err).__name__}: {err}"
            continue
        results["models"][name] = entry
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    reference, _ = load_eval_model(random_init="mae_vit_tiny_patch4_32", in_chans=1)
    results["pixels"] = pixel_baselines(spec, reference, args)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    md = table(results)
    (out / "quality.md").write_text(md)
    bar_chart(results, out / "quality.png")
    print(md)
    for name, r in results["models"].items():
        worse = [k for k in PROTOCOLS if r["pretrained"][k] <= r["random_init"][k]]
        below_pixels = [k for k in ("knn", "linear") if r["pretrained"][k] < results["pixels"][k]]
        print(f"[quality] {name}: beats its random init on {len(PROTOCOLS) - len(worse)}/{len(PROTOCOLS)} probes"
              + (f" (not on {', '.join(worse)})" if worse else "")
              + (f"; below raw pixels on {', '.join(below_pixels)}" if below_pixels else "; at or above raw pixels"))  # fmt: skip
    print(f"[quality] wrote {results_path}, {out / 'quality.md'} and {out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
