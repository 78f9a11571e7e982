"""The papers' key ablations at laptop scale on Fashion-MNIST, one pretraining budget per point.

    python benchmarks/ablations.py --budget 3                     # every sweep (see "Budget" below)
    python benchmarks/ablations.py --budget 1.5 --sweeps mae_mask_ratio mae_decoder_depth --out runs/abl

Every point pretrains a tiny preset (its recipe in configs/*_tiny_fmnist.yaml, the swept field changed) for
--budget CPU-minutes with benchmarks/quality.py's `pretrain` (the cosine schedule fitted to the steps the
budget allows: a costlier variant gets fewer steps, as it would on your laptop), then probes the frozen
encoder with kNN, linear and attentive probes (quality.py's `evaluate`) on --max-train labelled train images,
reporting top-1 on --max-test test images. A point shared by several sweeps (the recipe itself is the
baseline of every MAE sweep) is pretrained once: points are identified by the model's full config.

Sweeps (SWEEPS below): MAE mask ratio 0.5 / 0.75 / 0.9, norm-pix loss on/off, decoder depth 1 / 2 / 4 / 8,
random / block / grid masking; CAE alignment on/off, regressor on/off (the decoder on the encoder's latents,
MAE-style; without a regressor there is nothing to align, so that point has no alignment either), pixel vs
token targets (needs a tokenizer: --tokenizer PATH, or --tokenizer-steps N trains one with `mimkit tokenizer
train`, its CPU time recorded; without either the point is skipped with the reason in the JSON); ConvMAE
masked convolution on/off, multi-scale fusion on/off; MAE partial fine-tuning of the last 0 / 1 / 2 / 4 / all
blocks of the MAE baseline point's encoder (benchmarks/label_efficiency.py's fine-tuning recipe, on a
stratified --pft-fraction of the train labels, --pft-steps steps each).

Writes into --out: ablations.json (settings with the command line, every point's pretraining facts and probe
results, per sweep its points in order and the paper's finding), ablations.md (a table per sweep) and
ablation_<sweep>.png (one figure per sweep). --reuse keeps the points already in ablations.json.

Budget (measured 2026-12-06, Intel Xeon with AMX, one thread; third session, the attentive probe in bf16):
every point about 3 CPU-minutes of pretraining plus 1.5-2.5 of probes at the default 10,000 / 5,000 images
(median 1.7); every sweep 95 CPU-minutes (17 points 83, the partial fine-tuning 7, the feature recipes the
rest); --tokenizer-steps 1000 adds 17 CPU-minutes. benchmarks/evidence.sh runs
this (without cae_masking) and label_efficiency.py's defaults as two processes: under 3 hours on 2 cores
(docs/evidence.md, "Budget").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_efficiency  # noqa: E402
import quality  # noqa: E402

MAE, CAE, CONVMAE = "mae_vit_tiny_patch4_32", "cae_vit_tiny_patch4_32", "convmae_tiny_patch8_64"
PROTOCOLS = ("knn", "linear", "attentive")


@dataclasses.dataclass
class Sweep:
    model: str
    points: list[tuple[str, dict]]  # (label, model overrides on top of the recipe)
    paper: str  # the paper's finding this sweep is set beside
    baseline: str = ""  # label of the recipe's own point


SWEEPS: dict[str, Sweep] = {
    "mae_mask_ratio": Sweep(
        MAE,
        [("0.5", {"mask_ratio": 0.5}), ("0.75", {"mask_ratio": 0.75}), ("0.9", {"mask_ratio": 0.9})],
        "MAE (He et al. 2021) Fig. 5, ViT-L 800 ep: 75% is best for both fine-tuning and linear probing; "
        "linear probing climbs steadily up to 75%, fine-tuning is flat over 40-80%",
        "0.75",
    ),
    "mae_norm_pix": Sweep(
        MAE,
        [("norm-pix on", {"norm_pix_loss": True}), ("norm-pix off", {"norm_pix_loss": False})],
        "MAE Table 1d: pixels without norm 84.9 fine-tune / 73.5 linear; with per-patch normalisation 85.4 / 73.9",
        "norm-pix on",
    ),
    "mae_decoder_depth": Sweep(
        MAE,
        [(str(d), {"decoder_depth": d}) for d in (1, 2, 4, 8)],
        "MAE Table 1a (decoder blocks -> fine-tune / linear): 1: 84.8 / 65.5, 2: 84.9 / 70.0, 4: 84.9 / 71.9, "
        "8: 84.9 / 73.5 — depth matters for linear probing, hardly for fine-tuning",
        "2",
    ),
    "mae_masking": Sweep(
        MAE,
        [(k, {"mask_kind": k}) for k in ("random", "block", "grid")],
        "MAE Table 1f at 75% (fine-tune / linear): random 84.9 / 73.5, block 82.8 / 63.9, grid 84.0 / 66.0 "
        "(block at 50%: 83.9 / 72.3) — random > grid > block",
        "random",
    ),
    "cae_alignment": Sweep(
        CAE,
        [("alignment on", {}), ("alignment off", {"align_weight": 0.0})],
        "CAE (Chen et al. 2022) ablation of the alignment constraint: without it the encoder's latents need not "
        "live where the regressor predicts, and probing accuracy drops (linear and attentive, more than "
        "fine-tuning)",
        "alignment on",
    ),
    "cae_regressor": Sweep(
        CAE,
        [
            ("regressor + alignment", {}),
            ("regressor, no alignment", {"align_weight": 0.0}),
            ("no regressor (decoder on latents)", {"use_regressor": False, "align_weight": 0.0}),
        ],
        "CAE ablation of the latent regressor: with the decoder reading the encoder's latents directly (MAE-like) "
        "the encoder also does the reconstruction work, and the representation is worse for probing; the "
        "regressor plus alignment separates representation learning from the pretext task",
        "regressor + alignment",
    ),  # fmt: skip
    "cae_target": Sweep(
        CAE,
        [("pixel", {}), ("token", {"target": "token"})],
        "CAE v1 predicts DALL-E tokens; the paper reports pixel targets (with norm-pix) as close or better in "
        "later versions — the choice matters little compared with the regressor and alignment",
        "pixel",
    ),
    "cae_masking": Sweep(
        CAE,
        [("block (recipe)", {}), ("random", {"mask_kind": "random"})],
        "Not a paper table: CAE uses BEiT-style block-wise masking; on the tiny preset's 8x8 grid its blocks of at "
        "least 16 patches leave one or two large holes (docs/fidelity.md), and MAE found random masking best",
        "block (recipe)",
    ),
    "convmae_masked_conv": Sweep(
        CONVMAE,
        [("masked conv on", {"masked_conv": True}), ("masked conv off (leaky)", {"masked_conv": False})],
        "ConvMAE (Gao et al. 2022): without masked convolution the convolutions of stages 1-2 see the masked "
        "pixels, the pretext task leaks and the representation degrades; masked convolution is the paper's fix",
        "masked conv on",
    ),  # fmt: skip
    "convmae_fusion": Sweep(
        CONVMAE,
        [("fusion on", {"multiscale_fusion": True}), ("fusion off", {"multiscale_fusion": False})],
        "ConvMAE: fusing the stage-1/2 features into the encoder output (multi-scale decoder input) improves "
        "fine-tuning and linear probing over the single-scale stage-3 output",
        "fusion on",
    ),
}
PARTIAL_FT = "mae_partial_ft"
PARTIAL_FT_PAPER = (
    "MAE Fig. 9 (ViT-L): partial fine-tuning of 1 block lifts MAE from 73.5 (linear) to 81.0; a few blocks get "
    "close to full fine-tuning — MAE's features are strong but non-linear"
)
FEATURES = "feature_recipes"
FEATURES_NOTE = (
    "Not a paper ablation: which frozen features of the same encoder read out best with kNN and a linear probe "
    "(class token, mean of the patch tokens, one block's mean-pooled tokens with the final norm, the "
    "concatenation of the last k blocks), against kNN / logistic regression on raw pixels on the same images"
)
ALL_SWEEPS = [*SWEEPS, PARTIAL_FT, FEATURES]


def effective_config(name: str, overrides: dict) -> dict:
    """The full model config a point pretrains: preset, the recipe's model section, then `overrides`."""
    from mimkit import model_config

    cfg = dataclasses.asdict(model_config(name))
    recipe_model = {k: v for k, v in quality.recipe(name).get("model", {}).items() if k != "name"}
    if "in_chans" in cfg:
        cfg["in_chans"] = 1
    return {**cfg, **recipe_model, **overrides}


def point_id(name: str, overrides: dict) -> str:
    blob = json.dumps(
        {"name": name, "config": effective_config(name, overrides)}, sort_keys=True, default=str
    )
    return f"{name.split('_')[0]}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def train_tokenizer(path: Path, steps: int) -> float:
    """`mimkit tokenizer train` for CAE's token targets on Fashion-MNIST (32 px, patch 4, 512 codes); its
    CPU-seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-m", "mimkit", "tokenizer", "train", "--data", "fashion_mnist", "--img-size", "32",
         "--patch-size", "4", "--codebook-size", "512", "--steps", str(steps), "--num-workers", "0",
         "--device", "cpu", "--out", str(path)],
        check=True,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def run_point(name: str, overrides: dict, out: Path, args, spec) -> dict:
    pid = point_id(name, overrides)
    run_dir = out / "points" / pid
    pargs = argparse.Namespace(
        base_lr=None, batch_size=args.batch_size, precision=args.precision, num_workers=0, clock="cpu",
        seed=args.seed, steps=args.steps, linear_epochs=args.linear_epochs,
        attentive_epochs=args.attentive_epochs, bf16_features=args.bf16_features,
    )  # fmt: skip
    all_overrides = {**args.extra, **overrides}
    facts = quality.pretrain(name, args.budget, run_dir, pargs, all_overrides)
    (run_dir / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    t0 = time.process_time()
    probes = quality.evaluate(facts["checkpoint"], False, spec, out / "feature_cache", pargs)
    return {
        "model": name,
        "overrides": all_overrides,
        "pretrain": facts,
        "probes": probes,
        "probe_cpu_seconds": time.process_time() - t0,
    }


def partial_ft(checkpoint: str, args, out: Path) -> list[dict]:
    """Fine-tune the last k blocks of the checkpoint's encoder (k in args.pft_blocks; -1 = all)."""
    from mimkit.data.subsets import dataset_labels, stratified_indices
    from mimkit.eval.pipeline import DataSpec

    spec = DataSpec("fashion_mnist" if args.data is None else args.data, max_train=args.pft_max_train,
                    max_test=args.max_test, seed=args.seed)  # fmt: skip
    data = label_efficiency.LabelledData(spec)
    # label_efficiency's fine-tuning recipe as the sweep was measured with it: no LP-FT, crops of 25-100%
    ft_args = label_efficiency.parse_args(
        [
            "--ft-batch",
            str(args.pft_batch),
            "--ft-lr",
            str(args.pft_lr),
            "--crop-min",
            "0.25",
            "--lp-epochs",
            "0",
        ]
    )
    rows = []
    labels = None
    for k in args.pft_blocks:
        blocks = None if k < 0 else k
        if labels is None:
            from mimkit.eval.pipeline import load_eval_model

            model, _ = load_eval_model(checkpoint)
            labels = dataset_labels(data.get(model)["train_base"])
            idx = stratified_indices(labels, fraction=args.pft_fraction, seed=args.seed)
        r = label_efficiency.finetune_run(
            checkpoint, False, data, idx, args.pft_steps, ft_args, args.seed, blocks
        )
        r |= {"blocks": "all" if blocks is None else blocks, "num_labels": len(idx)}
        print(f"[ablations] partial fine-tuning, last {r['blocks']} blocks: {100 * r['accuracy']:.1f}% "
              f"({r['steps']} steps, {r['cpu_seconds']:.0f} CPU-s)", flush=True)  # fmt: skip
        rows.append(r)
    return rows


@torch.no_grad()
def block_features(encoder, dataset, bf16: bool = True, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Pooled features of every block of a frozen encoder over `dataset` (items (image, label)):
    {"block{i}": [N, D] mean of block i's tokens after the final norm (ConvMAE: its stages 1-2 too, as
    "stage1" / "stage2", without norm), "cls": [N, D] the class token of the output (ViTs), "labels": [N]}."""
    from mimkit.eval.features import get_encoder

    encoder = get_encoder(encoder).eval()
    prefix = getattr(encoder, "num_prefix_tokens", 0)
    names = [f["module"] for f in getattr(encoder, "feature_info", [])]
    out: dict[str, list[torch.Tensor]] = {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    for images, labels in loader:
        with label_efficiency.autocast(bf16):
            final, inter = encoder.forward_intermediates(images, norm=True, output_fmt="NLC")
        if prefix:
            out.setdefault("cls", []).append(final[:, 0].float())
        for i, y in enumerate(inter):
            name = names[i] if i < len(names) else f"feature{i}"
            name = name.replace("blocks.", "block").replace("stages.", "stage")
            out.setdefault(name, []).append(y.float().mean(dim=1))
        out.setdefault("labels", []).append(torch.as_tensor(labels).long())
    return {k: torch.cat(v) for k, v in out.items()}


def readout_name(label: str) -> str:
    """feature_info module names as read-outs: ConvMAE's "blocks1" / "blocks2" are its conv stages 1 and 2,
    "blocks3.i" its ViT block i."""
    if label.startswith("blocks3."):
        return "block" + label.split(".", 1)[1]
    return {"blocks1": "stage1 (conv)", "blocks2": "stage2 (conv)"}.get(label, label)


def pretrain_summary(checkpoint: str) -> str:
    """'6.0 CPU-min, 1328 steps' from the facts a pretraining run left beside (or above) its checkpoint."""
    for folder in (Path(checkpoint).parent, Path(checkpoint).parent.parent):
        for fname in ("facts.json", "pretrain_facts.json"):
            if (folder / fname).is_file():
                facts = json.loads((folder / fname).read_text())
                if "steps" not in facts:  # {model name: facts} of several runs
                    facts = next((v for k, v in facts.items() if k in checkpoint), {})
                if "steps" in facts:
                    return f"{facts['seconds'] / 60:.1f} CPU-min, {facts['steps']} steps"
    return "given checkpoint"


def feature_recipes(checkpoint: str, spec, args) -> list[dict]:
    """kNN and linear probe of several read-outs of one frozen encoder (see FEATURES_NOTE)."""
    import torch.nn.functional as F

    from mimkit.eval.knn import knn_classify
    from mimkit.eval.linear import LinearProbeConfig, train_linear_probe
    from mimkit.eval.pipeline import eval_datasets, load_eval_model

    model, _ = load_eval_model(checkpoint)
    train, test, _, num_classes = eval_datasets(model, spec)
    t0 = time.process_time()
    tr, te = block_features(model, train), block_features(model, test)
    extract = time.process_time() - t0
    blocks = [k for k in tr if k.startswith("block")]
    variants = {"cls": ["cls"]} if "cls" in tr else {}
    variants |= {k: [k] for k in tr if k not in ("labels", "cls")}
    for k in (2, 3, 4):
        if len(blocks) >= k:
            variants[f"concat last {k} blocks"] = blocks[-k:]
    if "cls" in tr:
        variants["cls + last block mean"] = ["cls", blocks[-1]]
    rows = []
    for label, parts in variants.items():
        t1 = time.process_time()
        # every part unit-normalised before concatenation, so kNN's cosine weighs the parts equally
        x = torch.cat([F.normalize(tr[p], dim=-1) for p in parts], dim=-1)
        xt = torch.cat([F.normalize(te[p], dim=-1) for p in parts], dim=-1)
        knn = knn_classify(
            x, tr["labels"], xt, te["labels"], k=20, temperature=0.07, num_classes=num_classes
        )[0]
        lin = train_linear_probe(
            x, tr["labels"], xt, te["labels"], num_classes,
            LinearProbeConfig(epochs=args.linear_epochs, seed=args.seed), False,
        )  # fmt: skip
        rows.append({"label": label, "parts": parts, "dims": x.shape[1], "knn": knn, "linear": lin.accuracy,
                     "linear_best_base_lr": lin.best_base_lr, "cpu_seconds": time.process_time() - t1})  # fmt: skip
        print(
            f"[ablations] features {label}: kNN {100 * knn:.1f}, linear {100 * lin.accuracy:.1f}", flush=True
        )
    return [{"label": "_extraction", "cpu_seconds": extract}] + rows


def tables(results: dict) -> str:
    out = []
    for sweep, s in results["sweeps"].items():
        out.append(f"### {sweep}\n\n{s['paper']}\n")
        if sweep == FEATURES:
            px = s.get("pixels", {})
            out.append("| encoder | read-out | dims | kNN | linear |\n|---|---|---|---|---|")
            out.append(f"| raw pixels | — | {px.get('dims', '?')} | {100 * px.get('knn', 0):.1f} | "
                       f"{100 * px.get('linear', 0):.1f} |")  # fmt: skip
            for enc, rows in s.get("encoders", {}).items():
                for r in rows["results"]:
                    if r["label"].startswith("_"):
                        continue
                    out.append(
                        f"| {enc} | {readout_name(r['label'])} | {r['dims']} | {100 * r['knn']:.1f} | {100 * r['linear']:.1f} |"
                    )
        elif sweep == PARTIAL_FT:
            out.append("| blocks fine-tuned | top-1 | steps | CPU-s |\n|---|---|---|---|")
            for r in s.get("results", []):
                out.append(
                    f"| {r['blocks']} | {100 * r['accuracy']:.1f} | {r['steps']} | {r['cpu_seconds']:.0f} |"
                )
        else:
            out.append(
                "| point | kNN | linear | attentive | pretraining steps | final loss |\n|---|---|---|---|---|---|"
            )
            for r in s["results"]:
                if "skipped" in r or "failed" in r:
                    out.append(f"| {r['label']} | {r.get('skipped') or r.get('failed')} | | | | |")
                    continue
                p = results["points"][r["point"]]
                cells = " | ".join(f"{100 * p['probes'][k]:.1f}" for k in PROTOCOLS)
                mark = " (baseline)" if r["label"] == s.get("baseline") else ""
                out.append(
                    f"| {r['label']}{mark} | {cells} | {p['pretrain']['steps']} | {p['pretrain']['loss_last']:.3f} |"
                )
        out.append("")
    return "\n".join(out) + "\n"


def figure(results: dict, sweep: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["sweeps"][sweep]
    st = results["settings"]
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=120)
    if sweep == FEATURES:
        encs = s.get("encoders", {})
        plt.close(fig)
        fig, axes = plt.subplots(1, max(1, len(encs)), figsize=(4.5 * max(1, len(encs)), 4), dpi=120, sharey=True,
                                 squeeze=False)  # fmt: skip
        px = s.get("pixels", {})
        for ax, (enc, rows) in zip(axes[0], encs.items()):  # one panel each: the read-outs differ
            rows = [r for r in rows["results"] if not r["label"].startswith("_")]
            xs = list(range(len(rows)))
            for proto, marker, ls in (("knn", "o", ":"), ("linear", "s", "-")):
                ax.plot(xs, [100 * r[proto] for r in rows], marker=marker, ls=ls, label=f"{proto}")
                if proto in px:
                    ax.axhline(
                        100 * px[proto],
                        color="0.4",
                        ls=ls,
                        lw=1,
                        label=f"raw pixels {proto} ({100 * px[proto]:.1f})",
                    )
            ax.set_xticks(xs, [readout_name(r["label"]) for r in rows], rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{enc}: {encs[enc]['pretrain']}", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("Fashion-MNIST test top-1 (%)")
        fig.suptitle("frozen-feature read-outs vs raw pixels (same train / test images)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return
    if sweep == PARTIAL_FT:
        rows = s.get("results", [])
        xs = [str(r["blocks"]) for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        ax.plot(xs, ys, "o-", label="fine-tune top-1")
        for x, y in zip(xs, ys):
            ax.annotate(
                f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7
            )
        ax.set_xlabel("last blocks fine-tuned (0 = linear on pooled tokens)")
        n = rows[0]["num_labels"] if rows else "?"
        ax.set_title(
            f"MAE partial fine-tuning: {n} labels, {rows[0]['steps'] if rows else '?'} steps each", fontsize=8
        )
    else:
        done = [r for r in s["results"] if "point" in r]
        xs = [r["label"] for r in done]
        for proto, marker in zip(PROTOCOLS, "os^"):
            ys = [100 * results["points"][r["point"]]["probes"][proto] for r in done]
            ax.plot(xs, ys, marker=marker, ls="-", label=proto)
            for x, y in zip(xs, ys):
                ax.annotate(
                    f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=6
                )
        if s.get("baseline") in xs:
            ax.axvline(xs.index(s["baseline"]), color="0.7", lw=6, alpha=0.3, zorder=0, label="recipe")
        skipped = [r["label"] for r in s["results"] if "point" not in r]
        budget = f"{st['steps']} steps" if st.get("steps") else f"{st['budget']:g} CPU-min"
        ax.set_title(f"{sweep}: {budget} of pretraining per point" + (f" (skipped: {', '.join(skipped)})" if skipped else ""),
                     fontsize=8)  # fmt: skip
        ax.set_xlabel(sweep.split("_", 1)[1].replace("_", " "))
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=3.0, help="CPU-minutes of pretraining per point")
    p.add_argument("--steps", type=int, default=0, help="pretrain exactly this many steps per point instead")
    p.add_argument("--sweeps", nargs="+", default=ALL_SWEEPS, choices=ALL_SWEEPS)
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--max-train", type=int, default=10000, help="labelled train images for the probes")
    p.add_argument("--max-test", type=int, default=5000, help="test images")
    p.add_argument("--linear-epochs", type=int, default=30)
    p.add_argument("--attentive-epochs", type=int, default=10)
    p.add_argument("--no-bf16-features", dest="bf16_features", action="store_false")
    p.add_argument("--batch-size", type=int, default=None, help="pretraining batch (default: the recipe's)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument(
        "--extra", type=json.loads, default={}, help="JSON model overrides for every point (tests)"
    )
    p.add_argument("--tokenizer", help="a `mimkit tokenizer train` file for CAE's token-target point")
    p.add_argument(
        "--tokenizer-steps", type=int, default=0, help="train a tokenizer for that point (0: skip it)"
    )
    p.add_argument(
        "--pft-fraction", type=float, default=0.1, help="labels for partial fine-tuning (stratified)"
    )
    p.add_argument("--pft-steps", type=int, default=300)
    p.add_argument("--pft-batch", type=int, default=64)
    p.add_argument("--pft-lr", type=float, default=8e-3)
    p.add_argument("--pft-blocks", type=int, nargs="+", default=[0, 1, 2, 4, -1], help="-1: all blocks")
    p.add_argument("--pft-max-train", type=int, default=None, help="train images to draw labels from")
    p.add_argument(
        "--data", default=None, help=argparse.SUPPRESS
    )  # partial fine-tuning's labelled data (tests)
    p.add_argument("--recipe-checkpoints", nargs="*", metavar="LABEL=PATH",
                   help="feature_recipes: these encoders (default: this run's MAE and ConvMAE recipe points)")  # fmt: skip
    p.add_argument(
        "--recipe-max-train", type=int, default=10000, help="feature_recipes: labelled train images"
    )
    p.add_argument("--recipe-max-test", type=int, default=10000, help="feature_recipes: test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="keep finished points of --out/ablations.json")
    p.add_argument("--replot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mimkit.eval.pipeline import DataSpec

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "ablations.json"
    if args.replot:
        results = json.loads(json_path.read_text())
        for sweep in results["sweeps"]:
            figure(results, sweep, out / f"ablation_{sweep}.png")
        (out / "ablations.md").write_text(tables(results))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(json_path.read_text()) if args.reuse and json_path.is_file() else {}
    results.setdefault("points", {})
    results.setdefault("sweeps", {})
    results["settings"] = {
        **{k: v for k, v in vars(args).items() if k not in ("reuse", "replot")},
        "command": shlex.join(["python", f"benchmarks/{Path(__file__).name}", *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "machine": f"{platform.machine()} {platform.processor()}".strip(), "clock": "cpu (process time)",
    }  # fmt: skip
    results.setdefault("invocations", []).append(results["settings"]["command"])  # --reuse runs add up
    spec = DataSpec("fashion_mnist", max_train=args.max_train, max_test=args.max_test, seed=args.seed)
    t_start = time.process_time()

    def save():
        results["cpu_seconds_this_invocation"] = time.process_time() - t_start
        json_path.write_text(json.dumps(results, indent=2) + "\n")

    tokenizer = args.tokenizer
    for sweep in [s for s in args.sweeps if s in SWEEPS]:
        sw = SWEEPS[sweep]
        entry = {"model": sw.model, "paper": sw.paper, "baseline": sw.baseline, "results": []}
        results["sweeps"][sweep] = entry
        for label, overrides in sw.points:
            overrides = dict(overrides)
            if overrides.get("target") == "token":
                if tokenizer is None and args.tokenizer_steps > 0:
                    tokenizer = str(out / "tokenizer_fmnist.safetensors")
                    cpu = train_tokenizer(Path(tokenizer), args.tokenizer_steps)
                    results["tokenizer"] = {
                        "path": tokenizer,
                        "steps": args.tokenizer_steps,
                        "cpu_seconds": cpu,
                    }
                if tokenizer is None:
                    entry["results"].append({"label": label, "skipped": (
                        "no tokenizer: token targets need `mimkit tokenizer train` first (--tokenizer PATH or "
                        "--tokenizer-steps N); not run within this budget")})  # fmt: skip
                    continue
                overrides["tokenizer_path"] = tokenizer
            pid = point_id(sw.model, {**args.extra, **overrides})
            if pid not in results["points"]:
                print(f"[ablations] {sweep} / {label}: pretraining {pid}", flush=True)
                try:
                    results["points"][pid] = run_point(sw.model, overrides, out, args, spec)
                except Exception as err:  # one broken point must not lose the others
                    print(f"[ablations] {sweep} / {label} failed: {type(err).__name__}: {err}", flush=True)
                    entry["results"].append({"label": label, "failed": f"{type(err).__name__}: {err}"})
                    save()
                    continue
            else:
                print(f"[ablations] {sweep} / {label}: re-using point {pid}", flush=True)
            entry["results"].append({"label": label, "point": pid})
            p = results["points"][pid]["probes"]
            print(
                f"[ablations] {sweep} / {label}: " + ", ".join(f"{k} {100 * p[k]:.1f}" for k in PROTOCOLS),
                flush=True,
            )
            save()
        figure(results, sweep, out / f"ablation_{sweep}.png")

    if PARTIAL_FT in args.sweeps:
        base_id = point_id(MAE, dict(args.extra))
        if base_id not in results["points"]:
            print(f"[ablations] {PARTIAL_FT}: pretraining the MAE recipe point {base_id}", flush=True)
            results["points"][base_id] = run_point(MAE, {}, out, args, spec)
            save()
        rows = partial_ft(results["points"][base_id]["pretrain"]["checkpoint"], args, out)
        results["sweeps"][PARTIAL_FT] = {
            "model": MAE,
            "point": base_id,
            "paper": PARTIAL_FT_PAPER,
            "results": rows,
        }
        save()
        figure(results, PARTIAL_FT, out / f"ablation_{PARTIAL_FT}.png")

    if FEATURES in args.sweeps:
        rspec = DataSpec(
            "fashion_mnist", max_train=args.recipe_max_train, max_test=args.recipe_max_test, seed=args.seed
        )
        given = dict(kv.split("=", 1) for kv in args.recipe_checkpoints or [])
        if not given:  # this run's recipe points of MAE and ConvMAE
            for model in (MAE, CONVMAE):
                pid = point_id(model, dict(args.extra))
                if pid not in results["points"]:
                    print(f"[ablations] {FEATURES}: pretraining the {model} recipe point {pid}", flush=True)
                    results["points"][pid] = run_point(model, {}, out, args, spec)
                    save()
                facts = results["points"][pid]["pretrain"]
                given[f"{model.split('_')[0]} ({pid})"] = facts["checkpoint"]
        entry = {"paper": FEATURES_NOTE, "encoders": {}, "max_train": args.recipe_max_train,
                 "max_test": args.recipe_max_test}  # fmt: skip
        results["sweeps"][FEATURES] = entry
        from mimkit.eval.pipeline import load_eval_model

        reference, _ = load_eval_model(random_init=MAE, in_chans=1)
        entry["pixels"] = quality.pixel_baselines(
            rspec, reference, argparse.Namespace(linear_epochs=args.linear_epochs, seed=args.seed)
        )
        for label, ckpt in given.items():
            pre = pretrain_summary(ckpt)
            entry["encoders"][label] = {
                "checkpoint": ckpt,
                "pretrain": pre,
                "results": feature_recipes(ckpt, rspec, args),
            }
            save()
        figure(results, FEATURES, out / f"ablation_{FEATURES}.png")

    save()
    (out / "ablations.md").write_text(tables(results))
    print(tables(results))
    print(f"[ablations] wrote {json_path}, {out / 'ablations.md'} and the figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
