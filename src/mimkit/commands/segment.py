"""`mimkit probe segment --checkpoint run/checkpoint.pt [--data canvas|folder --data-path DIR] [--out DIR]`

A segmentation check of an encoder: frozen (or its last --tune-blocks blocks tuned) under a per-patch
linear head and a small FPN head over its feature pyramid (mimkit.dense), on Fashion-MNIST garments placed
on a canvas or on a folder of image + mask PNG pairs. Writes result.json, result.md and predictions.png.
`add_segment_parser` adds it to `mimkit probe`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

EPILOG = """examples:
  mimkit probe segment --checkpoint runs/mae_tiny_fmnist/checkpoint.pt            # garments on a 64-px canvas
  mimkit probe segment --checkpoint runs/mae_tiny_fmnist/checkpoint.pt --random-init   # the baseline to beat
  mimkit probe segment --pixels --random-init mae_vit_tiny_patch4_32             # raw pixels, patch 4
  mimkit probe segment --checkpoint ckpt.pt --data folder --data-path my_seg/ --img-size 224 --tune-blocks 2

folder data: DIR/images/NAME.jpg|png + DIR/masks/NAME.png (or DIR/NAME.png + DIR/NAME_mask.png), optionally
in DIR/train/ and DIR/test/ (else --test-fraction is held out); a mask pixel is a class id, 255 = ignore;
DIR/classes.txt names the classes, one a line."""


HELP = "semantic segmentation check: frozen encoder + linear / FPN heads, mIoU and pixel accuracy"


def add_segment_parser(
    probe: argparse._SubParsersAction | argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """Add `segment` to `mimkit probe`; returns its parser.

    `probe`: the probe command's subparsers, or the probe parser itself while it picks its protocol with a
    positional argument (knn / linear / attentive): then `probe segment ...` is handed, before the probe
    parser reads it, to the segment parser with its own options (the probe protocols' options differ).
    """
    kwargs: dict[str, Any] = dict(description=(__doc__ or "").split("\n\n")[1], epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    if isinstance(probe, argparse._SubParsersAction):
        p = probe.add_parser("segment", help=HELP, **kwargs)
    else:
        p = argparse.ArgumentParser(prog=f"{probe.prog} segment", **kwargs)
        _dispatch_first_word(probe, "segment", p)
        example = (
            f"\n  {probe.prog} segment --checkpoint CKPT            # segmentation check (-h: its options)"
        )
        probe.epilog = (probe.epilog or "") + example
    p.add_argument("--checkpoint", help="what to evaluate: anything mimkit.load reads")
    p.add_argument(
        "--random-init", nargs="?", const="", metavar="MODEL_NAME",
        help="a randomly initialised model: a preset name, or with no name the --checkpoint's architecture",
    )  # fmt: skip
    p.add_argument(
        "--pixels", action="store_true",
        help="the raw-pixel baseline: the heads on patchified pixels at the model's stride (--pixel-patch alone)",
    )  # fmt: skip
    p.add_argument("--pixel-patch", type=int, default=4, help="patch size of --pixels without a model")
    p.add_argument("--data", default="canvas", choices=["canvas", "folder"])
    p.add_argument("--data-path", help="folder: the image + mask pairs; canvas: the Fashion-MNIST files")
    p.add_argument(
        "--img-size", type=int, nargs="+", help="H [W] the images are resized to (canvas: its size)"
    )
    p.add_argument("--canvas-size", type=int, default=64, help="canvas side in pixels (garments are 28 px)")
    p.add_argument("--max-garments", type=int, default=4, help="garments per canvas: 1 to this many")
    p.add_argument(
        "--num-train", type=int, default=2000, help="training images (canvases drawn / pairs used)"
    )
    p.add_argument("--num-test", type=int, default=500, help="test images")
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="folder without train/ and test/: held out"
    )
    p.add_argument("--head", nargs="+", default=["linear", "fpn"], choices=["linear", "fpn"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="head lr (AdamW, cosine; default: linear 1e-2, fpn 3e-3)")
    p.add_argument(
        "--lrs", type=float, nargs="+",
        help="several head lrs: one head each, the best on a held-out tenth of the training images is reported",
    )  # fmt: skip
    p.add_argument("--channels", type=int, default=64, help="pyramid / FPN width")
    p.add_argument("--tune-blocks", type=int, default=0, help="also tune the encoder's last k blocks")
    p.add_argument("--encoder-lr", type=float, default=1e-4, help="lr of the tuned blocks")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/segment[_random_init|_pixels])")
    p.set_defaults(func=run_segment)
    return p


def _dispatch_first_word(parser: argparse.ArgumentParser, word: str, target: argparse.ArgumentParser) -> None:
    """Make `parser` hand argument lists starting with `word` to `target` (argparse calls a sub-command's
    parse_known_args with the words after the command's name)."""
    own = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        if args and args[0] == word:
            return target.parse_known_args(args[1:], namespace)
        return own(args, namespace)

    setattr(parser, "parse_known_args", parse_known_args)  # noqa: B010  this instance's method, replaced


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_segment(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..eval.segmentation import (
        DenseSpec,
        SegmentationConfig,
        dense_encoder,
        predict,
        save_prediction_grid,
        segmentation_check,
        summary_lines,
    )  # fmt: skip

    if args.checkpoint is None and not args.random_init and not args.pixels:
        raise ValueError("give --checkpoint PATH, --random-init MODEL_NAME or --pixels")
    if args.data == "canvas":
        img_size = (args.canvas_size, args.canvas_size)
    elif args.img_size:
        img_size = (args.img_size[0], args.img_size[-1])
    else:
        img_size = None
    if img_size is None:
        from ..eval.pipeline import load_eval_model, model_geometry

        model, _ = load_eval_model(args.checkpoint, args.random_init or None, seed=args.seed)
        size = model_geometry(model)[0]
        img_size = (size, size) if isinstance(size, int) else tuple(size)
    dense = dense_encoder(
        args.checkpoint, args.random_init, args.pixels, img_size, args.pixel_patch, args.seed
    )
    spec = DenseSpec(args.data, args.data_path, args.num_train, args.num_test, args.canvas_size, args.max_garments,
                     args.test_fraction, args.seed)  # fmt: skip
    config = SegmentationConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, channels=args.channels,
                                tune_blocks=args.tune_blocks, encoder_lr=args.encoder_lr, seed=args.seed,
                                lrs=tuple(args.lrs) if args.lrs else None)  # fmt: skip
    result = segmentation_check(dense, spec, tuple(args.head), config, img_size, args.device)
    modules = result.pop("modules")

    suffix = "_pixels" if args.pixels else "_random_init" if args.random_init is not None else ""
    out = Path(args.out) if args.out else (
        Path(args.checkpoint).parent if args.checkpoint else Path("eval")) / f"segment{suffix}"  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = "\n".join(summary_lines([result])) + "\n"
    (out / "result.md").write_text(table)

    from ..data.segmentation import DenseTransform
    from ..eval.segmentation import DenseData, dense_datasets

    _, test_ds, classes = dense_datasets(dataclasses.replace(spec, num_test=6))
    shown = DenseData(test_ds, DenseTransform(img_size, dense.in_chans, dense.mean, dense.std))
    images = shown.images.to(args.device)
    preds = {f"{h} head": predict(m["encoder"], m["head"], images).cpu() for h, m in modules.items()}
    save_prediction_grid(out / "predictions.png", shown.images, shown.masks, preds, classes, dense.mean, dense.std,
                         title=f"{dense.name} ({dense.init})")  # fmt: skip
    print(table, end="")
    print(f"[mimkit] wrote {out / 'result.json'}, {out / 'result.md'} and {out / 'predictions.png'}")
    return 0
