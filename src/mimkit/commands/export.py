"""`mimkit export --format timm|hf|safetensors --checkpoint ckpt.pt --out PATH [--img-size N]`."""

from __future__ import annotations

import argparse
import textwrap


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a mimkit model for timm, Hugging Face transformers, or as plain safetensors",
        description=textwrap.fill(
            "Every export carries the preprocessing the model was trained with (input size, mean, std, "
            "bicubic resize, crop). timm (MAE, CAE): OUT.safetensors + OUT.json (timm name, kwargs and "
            "pretrained_cfg_overlay with the absolute weights path). hf (MAE): a directory with config.json, "
            "model.safetensors, preprocessor_config.json (AutoImageProcessor), README.md (model card) and mimkit.json. "
            "safetensors (every method, and fine-tuned classifiers): OUT.safetensors + OUT.json (mimkit config); "
            "ConvMAE exports this way. mimkit.load reads every one back. --img-size resizes the position embeddings "
            "(bicubic, class row kept).",
            100,
        ),
        epilog="examples:\n"
        "  mimkit export --format timm --checkpoint runs/photos/checkpoint.pt --out export/photos_vit\n"
        "  mimkit export --format hf --checkpoint runs/photos/checkpoint.pt --out export/photos-hf\n"
        "  mimkit export --format safetensors --checkpoint runs/photos/finetune/classifier.pt --out export/clf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=("timm", "hf", "safetensors"))
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint.pt (pretrain / import), encoder.safetensors, or a fine-tuned classifier.pt",
    )
    p.add_argument("--out", required=True, help="output file stem (timm, safetensors) or directory (hf)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="target resolution: N or H W")
    p.add_argument("--encoder-only", action="store_true", help="safetensors: write the encoder alone")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..interop import export

    img = None
    if args.img_size:
        if len(args.img_size) > 2:
            raise ValueError("--img-size takes one value (square) or two (H W)")
        img = args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size)
    kw = {"encoder_only": args.encoder_only} if args.format == "safetensors" else {}
    result = export(args.checkpoint, args.format, args.out, img, **kw)
    if args.format == "timm":
        print(
            f"wrote {result['file']}\nload with: {result['usage']}\n  timm_kwargs = {result['timm_kwargs']}"
        )
    else:
        print(f"wrote {result}\nload with: mimkit.load({str(result)!r})")
        if args.format == "hf":
            print(
                "  or transformers: AutoImageProcessor.from_pretrained(dir), AutoModel.from_pretrained(dir, mask_ratio=0.0)"
            )
    return 0
