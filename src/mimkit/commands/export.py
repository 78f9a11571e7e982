"""`mimkit export --format timm|hf|safetensors --checkpoint ckpt.pt --out PATH [--img-size N]`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a mimkit checkpoint for timm, Hugging Face transformers, or as plain safetensors",
        description="timm: OUT.safetensors + OUT.json (create_model name and kwargs). hf: a directory with "
        "config.json + model.safetensors (ViTMAE; MAE only). safetensors: OUT.safetensors + OUT.json (mimkit "
        "config). --img-size resizes the position embeddings (bicubic, class row kept).",
    )
    p.add_argument("--format", required=True, choices=("timm", "hf", "safetensors"))
    p.add_argument("--checkpoint", required=True, help="a mimkit checkpoint (pretrain's or import's output)")
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
        print(f"wrote {result}")
    return 0
