"""Segmentation check per method: each tiny preset's encoder, pretrained vs random init vs raw pixels, under a
per-patch linear head and a small FPN head, on Fashion-MNIST garments placed on a 64-px canvas.

    python benchmarks/segmentation.py --minutes 3                          # pretrain each tiny preset 3 CPU-min
    python benchmarks/segmentation.py --checkpoint mae_vit_tiny_patch4_32=runs/mae/checkpoint.pt --minutes 0
    python benchmarks/segmentation.py --minutes 20 --num-train 5000       # the quality benchmark's budget

Pretraining (when no --checkpoint is given for a preset and --minutes > 0) is benchmarks/quality.py's:
the method's CPU recipe (configs/*_tiny_fmnist.yaml) on the unlabelled Fashion-MNIST train split for
--minutes of --clock time. The dense task (mimkit.data.segmentation.GarmentCanvas): 1-4 garments of the
train split (training) or the test split (evaluation) per canvas, each pixel background or its garment's
class (11 classes), seeded. Encoders are frozen; heads train on their maps (mimkit.eval.segmentation).
Raw pixels: the same heads on patchified pixels at each encoder's stride.
Writes into --out: segmentation.json, segmentation.md (the table) and segmentation.png (test canvases,
ground truth and each encoder's FPN prediction).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from mimkit import list_models
from mimkit.data.segmentation import DenseTransform
from mimkit.eval.segmentation import (
    HEADS,
    DenseData,
    DenseSpec,
    SegmentationConfig,
    dense_datasets,
    dense_encoder,
    predict,
    save_prediction_grid,
    segmentation_check,
    summary_lines,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import pretrain  # noqa: E402  (the quality benchmark's pretraining, one way to do it)

SHOWN = 6  # test canvases in the picture


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="presets (default: every *_tiny_* preset registered)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="PRESET=PATH",
                   help="a pretrained checkpoint for a preset (repeatable); others are pretrained for --minutes")  # fmt: skip
    p.add_argument("--minutes", type=float, default=3.0, help="pretraining budget per method (0: none)")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    p.add_argument("--out", default="runs/segmentation")
    p.add_argument("--num-train", type=int, default=2000, help="training canvases")
    p.add_argument("--num-test", type=int, default=500, help="test canvases")
    p.add_argument("--canvas-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15, help="head training epochs")
    p.add_argument("--channels", type=int, default=32, help="pyramid / FPN width")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--linear-lrs", type=float, nargs="+", default=[1e-2, 3e-2, 1e-1],
                   help="linear head lrs, the best on a held-out tenth of the training canvases kept")  # fmt: skip
    p.add_argument("--fpn-lrs", type=float, nargs="+", default=[3e-3], help="FPN head lrs (as --linear-lrs)")
    p.add_argument("--batch-size", type=int, default=None, help="pretraining batch (default: the recipe's)")
    p.add_argument("--base-lr", type=float, default=None, help="pretraining base lr (default: the recipe's)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--reuse", action="store_true", help="re-use the pretraining runs recorded in --out")
    p.add_argument(
        "--replot", action="store_true", help="only rewrite segmentation.md from segmentation.json"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        results = json.loads((out / "segmentation.json").read_text())
        (out / "segmentation.md").write_text(table(results))
        print(table(results))
        return 0
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    models = args.models or list_models("*_tiny_*")
    given = dict(c.split("=", 1) for c in args.checkpoint)
    size = (args.canvas_size, args.canvas_size)
    spec = DenseSpec("canvas", None, args.num_train, args.num_test, args.canvas_size, seed=args.seed)
    config = SegmentationConfig(epochs=args.epochs, channels=args.channels, seed=args.seed)
    results: dict = {"settings": {**vars(args), "models": models, "torch": torch.__version__,
                                  "threads": torch.get_num_threads(), "python": sys.version.split()[0],
                                  "machine": f"{platform.machine()} {platform.processor()}".strip()},
                     "rows": [], "pretraining": {}}  # fmt: skip
    train_ds, test_ds, classes = dense_datasets(spec)
    data_cache: dict = {}  # (in_chans, mean, std) -> transformed (train, test, classes)
    shown_images = shown_masks = None
    predictions: dict[str, torch.Tensor] = {}
    pixel_strides_done: set = set()

    def check(dense, label: str) -> None:
        nonlocal shown_images, shown_masks
        key = (dense.in_chans, dense.mean, dense.std)
        if key not in data_cache:
            transform = DenseTransform(size, dense.in_chans, dense.mean, dense.std)
            data_cache[key] = (DenseData(train_ds, transform), DenseData(test_ds, transform), classes)
        started = time.process_time()
        head_lrs = {"linear": tuple(args.linear_lrs), "fpn": tuple(args.fpn_lrs)}
        r = segmentation_check(dense, spec, tuple(args.heads), config, size, args.device, data=data_cache[key],
                               head_lrs=head_lrs)  # fmt: skip
        modules = r.pop("modules")
        r["label"], r["cpu_seconds"] = label, round(time.process_time() - started, 1)
        test = data_cache[key][1]
        head = "fpn" if "fpn" in modules else args.heads[0]
        images = test.images[:SHOWN]
        predictions[label] = predict(
            modules[head]["encoder"], modules[head]["head"], images.to(args.device)
        ).cpu()
        if shown_images is None:
            shown_images, shown_masks = (images, dense.mean, dense.std), test.masks[:SHOWN]
        results["rows"].append(r)
        print("\n".join(summary_lines([r])[2:]), flush=True)
        (out / "segmentation.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    previous = out / "segmentation.json"
    earlier = (
        json.loads(previous.read_text()).get("pretraining", {}) if args.reuse and previous.is_file() else {}
    )
    for name in models:
        checkpoint = given.get(name)
        if checkpoint is None and name in earlier and Path(earlier[name]["checkpoint"]).is_file():
            print(f"[segmentation] {name}: re-using {earlier[name]['checkpoint']}", flush=True)
            results["pretraining"][name] = earlier[name]
            checkpoint = earlier[name]["checkpoint"]
        if checkpoint is None and args.minutes > 0:
            facts = pretrain(name, args.minutes, out / name, args)
            results["pretraining"][name] = facts
            checkpoint = facts["checkpoint"]
        overrides = {"in_chans": 1}
        if checkpoint is not None:
            check(
                dense_encoder(checkpoint, img_size=size, seed=args.seed), f"{name.split('_')[0]} pretrained"
            )
            random = dense_encoder(checkpoint, random_init="", img_size=size, seed=args.seed)
        else:
            random = _random(name, overrides, size, args.seed)
        check(random, f"{name.split('_')[0]} random init")
        stride = random.encoder.feature_info[-1]["reduction"]
        if stride not in pixel_strides_done:
            pixel_strides_done.add(stride)
            pixels = dense_encoder(None, pixels=True, img_size=size, pixel_patch=stride, seed=args.seed)
            check(pixels, f"pixels, patch {stride}")

    (out / "segmentation.md").write_text(table(results))
    images, mean, std = shown_images
    save_prediction_grid(out / "segmentation.png", images, shown_masks, {k: v for k, v in predictions.items()},
                         classes, mean, std, title="FPN head predictions on test canvases")  # fmt: skip
    print(table(results))
    print(
        f"[segmentation] wrote {out / 'segmentation.json'}, {out / 'segmentation.md'} and {out / 'segmentation.png'}"
    )
    return 0


def _random(name: str, overrides: dict, size, seed: int):
    """A preset at random init (with the method's CPU recipe's model changes), as a DenseEncoder."""
    from quality import recipe

    from mimkit.data import default_mean_std
    from mimkit.dense import encoder_at_size
    from mimkit.eval.pipeline import load_eval_model
    from mimkit.eval.segmentation import DenseEncoder

    model_cfg = {k: v for k, v in recipe(name).get("model", {}).items() if k != "name"}
    model, key = load_eval_model(random_init=name, seed=seed, **{**overrides, **model_cfg})
    mean, std = default_mean_std("fashion_mnist", model.config.in_chans)
    return DenseEncoder(encoder_at_size(model, size), name, "random", model.config.in_chans, mean, std, key)


def table(results: dict) -> str:
    s = results["settings"]
    rows = summary_lines(results["rows"])
    lines = [f"Fashion-MNIST garments on {s['canvas_size']}-px canvases: {s['num_train']} training / {s['num_test']} "
             f"test canvases, frozen encoders, heads trained {s['epochs']} epochs; mIoU over 11 classes "
             f"(background included), pixel accuracy, in %.", ""]  # fmt: skip
    for name, f in results.get("pretraining", {}).items():
        lines.append(f"- {name}: pretrained {f['seconds'] / 60:.1f} {f.get('clock', 'cpu')}-min, {f['steps']} steps "
                     f"of {f.get('batch_size', '?')} ({f['epochs']:.2f} epochs), loss {f['loss_first']:.3f} -> "
                     f"{f['loss_last']:.3f}")  # fmt: skip
    return "\n".join(lines + [""] + rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
