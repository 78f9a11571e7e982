"""Label efficiency on Fashion-MNIST: does pretraining pay when labels are few?

    python benchmarks/label_efficiency.py                  # full run (see "Budget" below)
    python benchmarks/label_efficiency.py --checkpoints mae_vit_tiny_patch4_32=runs/quality/mae_vit_tiny_patch4_32/checkpoint.pt ...

For each method's pretrained encoder (pretrained here for --minutes CPU-minutes by benchmarks/quality.py's
`pretrain`, or given with --checkpoints NAME=PATH), and for 1% / 10% / 100% of the Fashion-MNIST training
labels (a seeded stratified subset with exactly round(fraction x 6000) images per class,
mimkit.data.subsets), with 3 seeds (the subset and the training order change with the seed):

- fine-tuning end to end (mimkit.eval.finetune: mean-pooled tokens, LayerNorm, Linear), LP-FT: the head alone
  first for as many epochs as the fine-tuning then gets (--lp-epochs; encoder frozen), then everything at base
  lr 4e-3 with layer-wise lr decay 0.75, drop-path 0.1, random-resized crops of 60-100% of the area
  (--crop-min) and flips, label smoothing 0.1; RandAugment (--randaug), Mixup and CutMix off: they cost more
  steps than these budgets have — with RandAugment, 126 steps on 600 labels reached 56% where 60% without —
  for a fixed number of optimizer steps per label fraction (--ft-steps), the same for every net. On 600 labels
  (MAE, seed 0, 2026-12-06) the recipe went 73.2% (plain fine-tuning, lr 8e-3, crops 25-100%, 150 steps) ->
  75.7 (LP-FT, lr 4e-3) -> 78.2 (crops 60-100%) -> 79.8 (300 steps). --model-ft changes crops, layer decay
  or lr for one method (default: CAE without crops, layer decay 0.9: its encoder is crop-sensitive; MODEL_FT);
- frozen probes on the same labels: linear, attentive and kNN (mimkit.eval; lr chosen on 10% of the labels);
- baselines with the same labels: the same network from random init fine-tuned with the same step budget
  (layer-wise lr decay off, as from-scratch training has no pretrained lower layers to protect), multinomial
  logistic regression on raw standardised pixels (the linear probe's trainer; and kNN on pixels), and a small
  supervised CNN from timm (resnet10t, 1 input channel, no downloaded weights) trained with the same
  augmentation and step budget.

Test accuracy on the Fashion-MNIST test split (--max-test keeps a seeded random subset). Mean +- std over
seeds -> label_efficiency.json, label_efficiency.md (table) and label_efficiency.png (accuracy vs number of
labels, log x, one line per method/baseline) in --out. Results are saved after every setting of a (fraction, seed), and
--resume skips what is there.

Budget (CPU time, one thread, 2-core Intel Xeon with AMX, 2026-12-06; the attentive probe in bf16): a
fine-tuning step of 64 images costs 0.5-0.7 CPU-s for the ViT presets, 0.85-1.0 for ConvMAE, 0.2 for resnet10t
(LP-FT's head phase about a third of that); frozen features about 300 images per CPU-s. Per (fraction, seed)
with the defaults: 1% about 27 CPU-min (24 of fine-tuning 7 nets, 3 of probes); 10% 52 (31 without the random
inits); 100% 50.3 (features 8.6, probes 4.8, fine-tuning 7.5 / 10.0 / 12.7 for MAE / CAE / ConvMAE, the CNN
4.8). With 3 x 20 CPU-min of pretraining the defaults (3 seeds at 1%, 1 at 10% and 100%: --seeds-at) come to
about 4 CPU-hours; benchmarks/evidence.sh runs them beside the ablations as two 1-thread processes (random-init
fine-tuning at 1% only) in about 3 hours on 2 cores (docs/evidence.md, "Budget"). All 3 seeds at 10%
(--seeds-at 1:1) add about 1.5 CPU-hours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: pretrain, stack_pixels)

from mimkit.data.subsets import dataset_labels, stratified_indices  # noqa: E402
from mimkit.engine.distributed import autocast as mimkit_autocast  # noqa: E402

DEFAULT_MODELS = ("mae_vit_tiny_patch4_32", "cae_vit_tiny_patch4_32", "convmae_tiny_patch8_64")
# Per-method fine-tuning settings over the shared recipe (--model-ft), as each paper fine-tunes with its own.
# CAE's encoder is sensitive to random-resized crops: a linear head on its frozen 20-CPU-minute encoder, trained
# in the fine-tuning pipeline on 600 labels, reached 61.9% with crops of 60-100% of the area and 69.0% without
# (MAE: 75.9% with them); fine-tuning without crops and with layer decay 0.9 lifted CAE from 72.8 to 77.5 on
# seed 0 (docs/evidence.md section 1a). MAE lost 0.5 without crops, so the shared recipe keeps them.
MODEL_FT = {"cae_vit_tiny_patch4_32": {"crop_min": 1.0, "layer_decay": 0.9}}
FT_KEYS = ("crop_min", "layer_decay", "ft_lr")
SHORT = {
    "mae_vit_tiny_patch4_32": "MAE",
    "cae_vit_tiny_patch4_32": "CAE",
    "convmae_tiny_patch8_64": "ConvMAE",
}


def short(name: str) -> str:
    return SHORT.get(name, name.split("_")[0])


def parse_map(text: str, value=int) -> dict[float, object]:
    """'0.01:200,0.1:400' -> {0.01: 200, 0.1: 400}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, v = part.split(":")
        out[float(k)] = value(v)
    return out


def frac_key(fraction: float) -> str:
    return f"{fraction:g}"


# ---------------------------------------------------------------------------------------------- data


class LabelledData:
    """Train split (PIL, label) and test split with the eval transform, per model geometry, loaded once."""

    def __init__(self, spec):
        self.spec = spec
        self._by_geometry: dict = {}

    def get(self, model) -> dict:
        from mimkit.data import default_mean_std
        from mimkit.eval.pipeline import eval_splits, labelled_data, model_geometry

        img_size, in_chans = model_geometry(model)
        key = (str(img_size), in_chans)
        if key not in self._by_geometry:
            train_eval, test_eval, names, num_classes, _ = eval_splits(model, self.spec)
            train_base = labelled_data(self.spec, img_size, in_chans)[0]
            mean, std = default_mean_std(self.spec.source, in_chans)
            self._by_geometry[key] = {
                "train_base": train_base, "train_eval": train_eval, "test_eval": test_eval,
                "num_classes": num_classes, "img_size": img_size, "in_chans": in_chans,
                "mean": self.spec.mean or mean, "std": self.spec.std or std,
            }  # fmt: skip
        return self._by_geometry[key]


def subset_indices(labels: np.ndarray, fraction: float, seed: int) -> list[int]:
    """The labelled training images of one setting: every image at fraction 1, else a stratified subset."""
    if fraction >= 1.0:
        return list(range(len(labels)))
    return stratified_indices(labels, fraction=fraction, seed=seed)


# ------------------------------------------------------------------------------------------ training


def autocast(bf16: bool):
    """bf16 autocast on the CPU (mimkit's own), or nothing."""
    return mimkit_autocast("bf16" if bf16 else "fp32", torch.device("cpu"))


def finetune_config(
    steps: int, n_train: int, args, seed: int, random_init: bool, blocks=None, model: str | None = None
):
    """The fine-tuning recipe of this benchmark for a budget of `steps` optimizer steps on n_train images;
    `model`'s entry in --model-ft replaces the shared crop_min / layer_decay / ft_lr."""
    from mimkit.eval.finetune import FinetuneConfig

    own = {key: getattr(args, key) for key in FT_KEYS}
    own |= (args.model_ft or {}).get(model, {})
    batch = min(args.ft_batch, n_train - n_train % 2)
    per_epoch = max(1, n_train // batch)
    epochs = max(1, round(steps / per_epoch))
    return FinetuneConfig(
        epochs=epochs, batch_size=batch, base_lr=own["ft_lr"], weight_decay=0.05,
        layer_decay=1.0 if random_init else own["layer_decay"], warmup_epochs=args.ft_warmup * epochs,
        drop_path_rate=0.1, mixup=0.0, cutmix=0.0, label_smoothing=0.1, randaug=args.randaug, blocks=blocks,
        crop_scale=(own["crop_min"], 1.0), linear_probe_epochs=round(args.lp_epochs * epochs),
        seed=seed, precision="bf16" if args.bf16 else "fp32",
    )  # fmt: skip


def finetune_run(
    checkpoint: str, random_init: bool, data: LabelledData, indices, steps: int, args, seed: int, blocks=None,
    model_name: str | None = None,
) -> dict:  # fmt: skip
    """Fine-tune the checkpoint's encoder (or its random init) on train[indices]; test top-1 and costs.
    model_name picks the method's --model-ft settings (the random init gets them too)."""
    from mimkit.eval.finetune import FinetuneClassifier, finetune, finetune_transform
    from mimkit.eval.pipeline import Transformed, load_eval_model

    cfg = finetune_config(steps, len(indices), args, seed, random_init, blocks, model_name)
    model, _ = load_eval_model(
        checkpoint, "" if random_init else None, drop_path_rate=cfg.drop_path_rate, seed=seed
    )
    d = data.get(model)
    transform = finetune_transform(d["img_size"], d["in_chans"], d["mean"], d["std"], cfg)
    train = Transformed(torch.utils.data.Subset(d["train_base"], list(indices)), transform)
    classifier = FinetuneClassifier(model, d["num_classes"])
    start = time.process_time()
    res = finetune(
        classifier, train, d["test_eval"], d["num_classes"], cfg, progress=False, log=lambda *a: None
    )
    return {
        "accuracy": (res["predictions"] == res["labels"]).float().mean().item(),
        "steps": res["history"][-1]["steps"],
        "epochs": cfg.epochs,
        "loss_last_epoch": res["history"][-1]["loss"],
        "cpu_seconds": time.process_time() - start,
    }


def train_cnn(data: LabelledData, reference_model, indices, steps: int, args, seed: int) -> dict:
    """A timm CNN (args.cnn, 1 input channel, random init) trained from scratch on train[indices] with the
    fine-tuning augmentation, AdamW (lr args.cnn_lr x batch / 256, weight decay 0.05), label smoothing 0.1
    and a cosine schedule over the same step budget; test top-1."""
    import timm
    import torch.nn.functional as F

    from mimkit.engine.optim import cosine_lr
    from mimkit.eval.finetune import finetune_transform, predict
    from mimkit.eval.pipeline import Transformed

    d = data.get(reference_model)
    cfg = finetune_config(steps, len(indices), args, seed, random_init=True)
    torch.manual_seed(seed)
    net = timm.create_model(args.cnn, pretrained=False, in_chans=d["in_chans"], num_classes=d["num_classes"])
    train = Transformed(
        torch.utils.data.Subset(d["train_base"], list(indices)),
        finetune_transform(d["img_size"], d["in_chans"], d["mean"], d["std"], cfg),
    )
    loader = torch.utils.data.DataLoader(
        train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    total = cfg.epochs * len(loader)
    lr = args.cnn_lr * cfg.batch_size / 256
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    warmup = round(args.ft_warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, 1.0, warmup, 0.0))
    start, step = time.process_time(), 0
    net.train()
    for _ in range(cfg.epochs):
        for images, labels in loader:
            with autocast(args.bf16):
                loss = F.cross_entropy(net(images).float(), torch.as_tensor(labels), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    test_loader = torch.utils.data.DataLoader(d["test_eval"], batch_size=256)
    preds, labels = predict(net, test_loader, torch.device("cpu"), "bf16" if args.bf16 else "fp32")
    return {
        "accuracy": (preds == labels).float().mean().item(),
        "steps": step,
        "epochs": cfg.epochs,
        "params": sum(p.numel() for p in net.parameters()),
        "cpu_seconds": time.process_time() - start,
    }


def frozen_features(model, model_key: dict, data: LabelledData, union: list[int], cache: Path, args) -> dict:
    """Features (pooled, and tokens for the attentive probe) of train[union] and of the test split, cached."""
    from mimkit.eval.features import cached_features
    from mimkit.eval.pipeline import data_key

    d = data.get(model)
    digest = hashlib.sha1(np.asarray(union, dtype=np.int64).tobytes()).hexdigest()[:16]
    out = {}
    for split, ds, extra in (
        ("train", torch.utils.data.Subset(d["train_eval"], union), {"indices": digest}),
        ("test", d["test_eval"], {}),
    ):
        limit = data.spec.max_train if split == "train" else data.spec.max_test
        key = {
            "model": model_key,
            "data": data_key(model, data.spec, split, limit),
            "bf16": args.bf16,
            **extra,
        }
        out[split] = cached_features(
            model, ds, cache, key, keep_tokens=True, verbose=False, pool="auto", bf16=args.bf16,
            batch_size=256, progress=False,
        )  # fmt: skip
    return out


def attentive_epochs(n: int, args) -> int:
    """--attentive-epochs, fewer where the labels are many: each lr's probe sees at most
    --attentive-samples images (20 epochs at 1% and 10% by default, 2 at 100%; at 100% the 20 epochs alone
    would cost about an hour of CPU per encoder)."""
    return max(1, min(args.attentive_epochs, round(args.attentive_samples / n)))


def probe_batch(n: int) -> int:
    return int(min(256, max(16, n // 10)))


def probes_on(feats: dict, rows: np.ndarray, num_classes: int, heads: int, args, seed: int) -> dict:
    """kNN, linear and attentive probes trained on the rows of the train features; test top-1 each."""
    from mimkit.eval.attentive import AttentiveProbeConfig, train_attentive_probe
    from mimkit.eval.knn import knn_classify
    from mimkit.eval.linear import LinearProbeConfig, train_linear_probe

    tr, te = feats["train"], feats["test"]
    rows_t = torch.as_tensor(rows)
    x, y, n = tr["features"][rows_t], tr["labels"][rows_t], len(rows)
    out, t0 = {}, time.process_time()
    if "knn" in args.protocols:
        out["knn"] = {"accuracy": knn_classify(x, y, te["features"], te["labels"], k=min(20, n), temperature=0.07,
                                               num_classes=num_classes)[0]}  # fmt: skip
    if "linear" in args.protocols:
        res = train_linear_probe(
            x, y, te["features"], te["labels"], num_classes,
            LinearProbeConfig(epochs=args.linear_epochs, batch_size=probe_batch(n), seed=seed), False,
        )  # fmt: skip
        out["linear"] = {"accuracy": res.accuracy, "best_base_lr": res.best_base_lr}
    if "attentive" in args.protocols:
        epochs = attentive_epochs(n, args)
        res = train_attentive_probe(
            tr["tokens"][rows_t], y, te["tokens"], te["labels"], num_classes,
            AttentiveProbeConfig(epochs=epochs, batch_size=probe_batch(n), seed=seed,
                                 precision="bf16" if args.bf16 else "fp32"), heads, False,
        )  # fmt: skip
        out["attentive"] = {"accuracy": res.accuracy, "best_base_lr": res.best_base_lr, "epochs": epochs}
    out["_cpu_seconds"] = time.process_time() - t0
    return out


# ------------------------------------------------------------------------------------------- results


def record(results: dict, setting: str, fraction: float, n_labels: int, seed: int, value: dict) -> None:
    entry = (
        results["settings_results"]
        .setdefault(setting, {})
        .setdefault(frac_key(fraction), {"num_labels": n_labels, "runs": {}})
    )
    entry["runs"][str(seed)] = value
    accs = [r["accuracy"] for r in entry["runs"].values()]
    entry["mean"] = float(np.mean(accs))
    entry["std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
    entry["seeds"] = len(accs)


def done(results: dict, setting: str, fraction: float, seed: int) -> bool:
    return str(seed) in results["settings_results"].get(setting, {}).get(frac_key(fraction), {}).get(
        "runs", {}
    )


def merge_reports(reports: list[dict]) -> dict:
    """One report from runs of the same encoders on disjoint (fraction, seed) sets (one process per core):
    every run of every setting, mean and std over the seeds recomputed, each run's command kept."""
    merged = {k: v for k, v in reports[0].items() if k != "settings_results"}
    merged["settings"] = dict(reports[0]["settings"])
    merged["settings"]["fractions"] = sorted({f for r in reports for f in r["settings"]["fractions"]})
    merged["settings"]["commands"] = [r["settings"]["command"] for r in reports]
    merged["num_labels"] = {k: v for r in reports for k, v in r["num_labels"].items()}
    merged["cpu_seconds_runs"] = [r.get("cpu_seconds_this_invocation") for r in reports]
    merged["settings_results"] = {}
    for r in reports:  # run by run: two reports may hold different seeds of one fraction
        for setting, per_fraction in r["settings_results"].items():
            for key, entry in per_fraction.items():
                for seed, value in entry["runs"].items():
                    record(merged, setting, float(key), entry["num_labels"], int(seed), value)
    return merged


def table(results: dict) -> str:
    fractions = results["settings"]["fractions"]
    labels = {frac_key(f): results["num_labels"].get(frac_key(f), "?") for f in fractions}
    head = (
        "| setting | " + " | ".join(f"{100 * f:g}% ({labels[frac_key(f)]} labels)" for f in fractions) + " |"
    )
    rows = [head, "|---" * (len(fractions) + 1) + "|"]
    for setting, per in results["settings_results"].items():
        cells = []
        for f in fractions:
            e = per.get(frac_key(f))
            if e is None:
                cells.append("—")
            elif e["seeds"] > 1:
                cells.append(f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f} (n={e['seeds']})")
            else:
                cells.append(f"{100 * e['mean']:.1f} (n=1)")
        rows.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ft, ax_pr) = plt.subplots(1, 2, figsize=(12, 6.2), dpi=120, sharey=True)
    methods = list(results["encoders"])
    colour = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    styles = {"fine-tune": "-", "random-init fine-tune": ":", "linear": "-", "attentive": "--", "kNN": ":"}
    for setting, per in results["settings_results"].items():
        pts = sorted((e["num_labels"], 100 * e["mean"], 100 * e["std"]) for e in per.values())
        if not pts:
            continue
        x, y, s = zip(*pts)
        method = next((m for m in methods if setting.startswith(short(m) + " ")), None)
        kind = setting[len(short(method)) + 1 :] if method else setting
        if method is None:  # baselines: grey / black
            c, ls = ("0.2", "-.") if "CNN" in setting else ("0.55", "-" if "logistic" in setting else ":")
        else:
            c, ls = colour[method], styles.get(kind, "-")
        ax = ax_ft if ("fine-tune" in kind or "CNN" in setting) else ax_pr
        if method is None and "logistic" in setting:
            for a in (ax_ft, ax_pr):  # the pixel baseline on both panels
                a.errorbar(x, y, yerr=s, color=c, ls=ls, marker="s", ms=3, capsize=2, label=setting)
            continue
        if kind == "kNN" or (method is None and "kNN" in setting):
            continue  # kNN only in the table: the panel is already busy
        marker = {"random-init fine-tune": "x", "attentive": "^"}.get(kind, "o")
        ax.errorbar(x, y, yerr=s, color=c, ls=ls, marker=marker, ms=4, capsize=2, label=setting)
    s = results["settings"]
    for ax, title in ((ax_ft, "fine-tuning (and supervised baselines)"), (ax_pr, "frozen encoder: probes")):
        ax.set_xscale("log")
        ax.set_xlabel("labelled training images (log)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(
            fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2
        )  # below: never on a point
        xs = [e["num_labels"] for per in results["settings_results"].values() for e in per.values()]
        if xs:
            ax.set_xlim(min(xs) / 1.8, max(xs) * 1.8)
    ax_ft.set_ylabel(f"Fashion-MNIST test top-1 (%), {s.get('max_test') or 10000} images")
    fig.suptitle(
        f"Label efficiency: encoders pretrained {results.get('pretrain_summary', '')}; mean ± std over seeds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def encoders(args, out: Path) -> dict:
    """{name: {"checkpoint", "pretrain"}}: the given --checkpoints, else pretraining runs of --minutes."""
    given = dict(kv.split("=", 1) for kv in args.checkpoints or [])
    found = {}
    for name in args.models:
        if name in given:
            facts = {}
            for folder in (Path(given[name]).parent, Path(given[name]).parent.parent):  # facts of the run
                if (folder / "pretrain_facts.json").is_file():
                    facts = json.loads((folder / "pretrain_facts.json").read_text())
                    facts = facts.get(name, facts)
                    break
            found[name] = {"checkpoint": given[name], "pretrain": facts or "given"}
            continue
        run_dir = out / "pretrain" / name
        if args.resume and (run_dir / "checkpoint.pt").is_file() and (run_dir / "facts.json").is_file():
            facts = json.loads((run_dir / "facts.json").read_text())
        else:
            pargs = argparse.Namespace(
                base_lr=None, batch_size=None, precision=args.precision, num_workers=0, clock="cpu", seed=0,
                steps=args.steps,
            )  # fmt: skip
            facts = quality.pretrain(name, args.minutes, run_dir, pargs, args.model_overrides)
            (run_dir / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
        found[name] = {"checkpoint": facts["checkpoint"], "pretrain": facts}
    return found


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument(
        "--checkpoints", nargs="*", metavar="NAME=PATH", help="re-use these pretrained checkpoints"
    )
    p.add_argument("--minutes", type=float, default=20.0, help="CPU-minutes of pretraining per method")
    p.add_argument("--steps", type=int, default=0, help="pretrain exactly this many steps instead")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="pretraining precision")
    p.add_argument(
        "--model-overrides", type=json.loads, default=None, help="JSON dict for every pretraining (tests)"
    )
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--seeds-at", default="0.1:1,1:1",
        help="fewer seeds at some fractions (default: 1 at 10%% and 100%%, for time; '1:1' for 3 at 10%%)",
    )  # fmt: skip
    p.add_argument("--ft-steps", default="0.01:300,0.1:600,1:600", help="fine-tuning steps per fraction")
    p.add_argument("--ft-batch", type=int, default=64)
    p.add_argument("--ft-lr", type=float, default=4e-3, help="fine-tuning base lr (lr = base x batch / 256)")
    p.add_argument(
        "--ft-warmup", type=float, default=0.1, help="linear warm-up over this fraction of the steps"
    )
    p.add_argument("--randaug", action="store_true", help="RandAugment(2, 9) in fine-tuning and the CNN")
    p.add_argument(
        "--crop-min",
        type=float,
        default=0.6,
        help="RandomResizedCrop's smallest area in fine-tuning and the CNN",
    )
    p.add_argument(
        "--lp-epochs", type=float, default=1.0,
        help="LP-FT: train the head alone first for this many times the fine-tuning epochs (0 = off)",
    )  # fmt: skip
    p.add_argument("--layer-decay", type=float, default=0.75, help="pretrained encoders (random init: 1.0)")
    p.add_argument(
        "--model-ft", type=json.loads, default=MODEL_FT, metavar="JSON",
        help="per-method fine-tuning settings over the shared ones: {model: {crop_min, layer_decay, ft_lr}} "
        "(default: %(default)s; '{}' = one recipe for all)",
    )  # fmt: skip
    p.add_argument("--cnn", default="resnet10t", help="timm model name of the supervised CNN baseline")
    p.add_argument("--cnn-lr", type=float, default=4e-3, help="CNN base lr (lr = base x batch / 256)")
    p.add_argument("--protocols", nargs="+", default=["finetune", "linear", "attentive", "knn"],
                   choices=["finetune", "linear", "attentive", "knn"])  # fmt: skip
    p.add_argument("--baselines", nargs="*", default=["random_init", "pixels", "cnn"],
                   choices=["random_init", "pixels", "cnn"])  # fmt: skip
    p.add_argument(
        "--random-init-models", nargs="*", help="random-init fine-tuning only for these (default all)"
    )
    p.add_argument(
        "--random-init-up-to", type=float, default=0.1,
        help="random-init fine-tuning at fractions up to this one (at 100%% it costs about 30 CPU-min)",
    )  # fmt: skip
    p.add_argument("--linear-epochs", type=int, default=30)
    p.add_argument("--attentive-epochs", type=int, default=20)
    p.add_argument(
        "--attentive-samples", type=int, default=120_000,
        help="cap on the images each attentive probe sees (epochs = min(--attentive-epochs, this / labels))",
    )  # fmt: skip
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 fine-tuning and features")
    p.add_argument("--data", default="fashion_mnist", help="labelled data source (synthetic: tests)")
    p.add_argument(
        "--max-train", type=int, default=None, help="train images to draw labels from (default all)"
    )
    p.add_argument(
        "--max-test", type=int, default=None, help="test images (seeded random subset; default all)"
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="runs/label_efficiency")
    p.add_argument(
        "--resume", action="store_true", help="keep finished entries of --out/label_efficiency.json"
    )
    p.add_argument("--replot", action="store_true", help="only rewrite the table and plot from the JSON")
    p.add_argument(
        "--merge", nargs="+", metavar="JSON",
        help="merge reports of runs split by fraction into --out (then table and plot)",
    )  # fmt: skip
    args = p.parse_args(argv)
    for model, own in (args.model_ft or {}).items():
        unknown = set(own) - set(FT_KEYS) if isinstance(own, dict) else {"(not a dict)"}
        if unknown:
            p.error(f"--model-ft: {model} has {sorted(unknown)}; allowed keys are {list(FT_KEYS)}")
    return args


def main(argv=None) -> int:
    from mimkit.eval.attentive import encoder_num_heads
    from mimkit.eval.features import get_encoder
    from mimkit.eval.pipeline import DataSpec, load_eval_model

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "label_efficiency.json"
    if args.merge:  # runs split by fraction (one process per core) -> one report
        results = merge_reports([json.loads(Path(path).read_text()) for path in args.merge])
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    if args.replot or args.merge:
        results = json.loads(json_path.read_text())
        (out / "label_efficiency.md").write_text(table(results))
        plot(results, out / "label_efficiency.png")
        print(table(results))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(json_path.read_text()) if args.resume and json_path.is_file() else {}
    results.setdefault("settings_results", {})
    results["settings"] = {
        **{k: v for k, v in vars(args).items() if k not in ("resume", "replot")},
        "command": shlex.join(["python", f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "machine": f"{platform.machine()} {platform.processor()}".strip(), "clock": "cpu (process time)",
    }  # fmt: skip
    ft_steps, seeds_at = parse_map(args.ft_steps), parse_map(args.seeds_at)
    missing = [f for f in args.fractions if f not in ft_steps]
    if missing and "finetune" in args.protocols:
        raise SystemExit(f"--ft-steps has no budget for fraction(s) {missing}")
    spec = DataSpec(args.data, max_train=args.max_train, max_test=args.max_test, seed=0)
    data = LabelledData(spec)
    t_start = time.process_time()

    enc = encoders(args, out)
    results["encoders"] = enc
    p0 = next(iter(enc.values()))["pretrain"]
    results["pretrain_summary"] = (
        f"{p0['seconds'] / 60:.1f} CPU-min each"
        if isinstance(p0, dict) and "seconds" in p0
        else "(given checkpoints)"
    )
    models = {name: load_eval_model(e["checkpoint"]) for name, e in enc.items()}
    reference = next(iter(models.values()))[0]
    # the raw-pixel and CNN baselines see the 32-px one-channel images the ViT presets see
    reference32, _ = load_eval_model(random_init="mae_vit_tiny_patch4_32", in_chans=1)
    labels = dataset_labels(data.get(reference)["train_base"])
    num_classes = data.get(reference)["num_classes"]
    plan = [(f, s) for f in args.fractions for s in args.seeds[: int(seeds_at.get(f, len(args.seeds)))]]
    subsets = {(f, s): subset_indices(labels, f, s) for f, s in plan}
    results["num_labels"] = {frac_key(f): len(subsets[(f, s)]) for f, s in plan}
    union = sorted(set().union(*subsets.values()))
    random_init_models = args.random_init_models if args.random_init_models is not None else list(enc)

    def save():
        results["cpu_seconds_this_invocation"] = time.process_time() - t_start
        json_path.write_text(json.dumps(results, indent=2) + "\n")

    # frozen features once per encoder (the union of every subset's images, and the test split)
    probes = [p for p in args.protocols if p != "finetune"]
    feats = {}
    if probes:
        for name, (model, key) in models.items():
            t0 = time.process_time()
            feats[name] = frozen_features(model, key, data, union, out / "feature_cache", args)
            results.setdefault("feature_cpu_seconds", {})[name] = time.process_time() - t0
            print(f"[label-eff] {short(name)} features of {len(union)} + {len(feats[name]['test']['labels'])} images "
                  f"({time.process_time() - t0:.0f} CPU-s)", flush=True)  # fmt: skip
    pixels = None
    if "pixels" in args.baselines:
        d32 = data.get(reference32)
        pixels = {"train": quality.stack_pixels(torch.utils.data.Subset(d32["train_eval"], union)),
                  "test": quality.stack_pixels(d32["test_eval"])}  # fmt: skip

    for f, seed in plan:
        idx = subsets[(f, seed)]
        rows = np.searchsorted(union, idx)
        n = len(idx)
        tag = f"{100 * f:g}% ({n} labels) seed {seed}"
        if pixels is not None and not done(results, "raw pixels: logistic regression", f, seed):
            from mimkit.eval.knn import knn_classify
            from mimkit.eval.linear import LinearProbeConfig, train_linear_probe

            (x, y), (xt, yt) = pixels["train"], pixels["test"]
            x, y = x[torch.as_tensor(rows)], y[torch.as_tensor(rows)]
            t0 = time.process_time()
            lin = train_linear_probe(x, y, xt, yt, num_classes,
                                     LinearProbeConfig(epochs=args.linear_epochs, batch_size=probe_batch(n), seed=seed), False)  # fmt: skip
            record(results, "raw pixels: logistic regression", f, n, seed,
                   {"accuracy": lin.accuracy, "best_base_lr": lin.best_base_lr, "cpu_seconds": time.process_time() - t0})  # fmt: skip
            acc_knn = knn_classify(x, y, xt, yt, k=min(20, n), temperature=0.07, num_classes=num_classes)[0]
            record(results, "raw pixels: kNN", f, n, seed, {"accuracy": acc_knn})
            print(f"[label-eff] {tag}: pixels logistic regression {100 * lin.accuracy:.1f}, kNN {100 * acc_knn:.1f}", flush=True)  # fmt: skip
        for name, (model, _) in models.items():
            if probes and not done(
                results, f"{short(name)} linear" if "linear" in probes else f"{short(name)} kNN", f, seed
            ):
                heads = encoder_num_heads(get_encoder(model), feats[name]["train"]["tokens"].shape[-1])
                res = probes_on(feats[name], rows, num_classes, heads, args, seed)
                cpu = res.pop("_cpu_seconds")
                for proto, value in res.items():
                    label = {"knn": "kNN", "linear": "linear", "attentive": "attentive"}[proto]
                    record(
                        results, f"{short(name)} {label}", f, n, seed, {**value, "probes_cpu_seconds": cpu}
                    )
                print(f"[label-eff] {tag}: {short(name)} probes " + ", ".join(
                    f"{k} {100 * v['accuracy']:.1f}" for k, v in res.items()) + f" ({cpu:.0f} CPU-s)", flush=True)  # fmt: skip
            save()
            if "finetune" not in args.protocols:
                continue
            inits = [False] + (
                [True]
                if "random_init" in args.baselines
                and name in random_init_models
                and f <= args.random_init_up_to
                else []
            )
            for random_init in inits:
                setting = f"{short(name)} {'random-init fine-tune' if random_init else 'fine-tune'}"
                if done(results, setting, f, seed):
                    continue
                r = finetune_run(
                    enc[name]["checkpoint"], random_init, data, idx, ft_steps[f], args, seed, model_name=name
                )
                record(results, setting, f, n, seed, r)
                print(f"[label-eff] {tag}: {setting} {100 * r['accuracy']:.1f} ({r['steps']} steps, "
                      f"{r['cpu_seconds']:.0f} CPU-s)", flush=True)  # fmt: skip
                save()
        if "cnn" in args.baselines and "finetune" in args.protocols:
            setting = f"CNN {args.cnn} (supervised, random init)"
            if not done(results, setting, f, seed):
                r = train_cnn(data, reference32, idx, ft_steps[f], args, seed)
                record(results, setting, f, n, seed, r)
                print(f"[label-eff] {tag}: {setting} {100 * r['accuracy']:.1f} ({r['steps']} steps, "
                      f"{r['cpu_seconds']:.0f} CPU-s)", flush=True)  # fmt: skip
        save()

    (out / "label_efficiency.md").write_text(table(results))
    plot(results, out / "label_efficiency.png")
    print(table(results))
    print(f"[label-eff] wrote {json_path}, {out / 'label_efficiency.md'} and {out / 'label_efficiency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
