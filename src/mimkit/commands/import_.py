"""`mimkit import --from mae|cae|convmae|hf SRC --out ckpt.pt`: official / Hugging Face weights -> mimkit."""

from __future__ import annotations

import argparse
import json


def _value(text: str):
    """Parse KEY=VALUE values as JSON when possible (numbers, booleans, lists), else keep the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="convert an official MAE/CAE/ConvMAE checkpoint or a Hugging Face ViTMAE directory",
        description="Convert foreign weights into a mimkit checkpoint without unpickling arbitrary objects "
        "(only tensors, containers and argparse.Namespace are accepted). The model configuration is "
        "inferred from tensor shapes; head counts assume the standard ViT sizes (override with --set).",
    )
    p.add_argument("--from", dest="source", required=True, choices=("mae", "cae", "convmae", "hf"))
    p.add_argument(
        "src", help="checkpoint file (.pth/.pt/.safetensors) or Hugging Face directory (for --from hf)"
    )
    p.add_argument("--out", required=True, help="mimkit checkpoint to write, e.g. imported.pt")
    p.add_argument("--model", default=None, help="registered preset name (default: inferred from shapes)")
    p.add_argument(
        "--encoder-only",
        action="store_true",
        help="the file holds only an encoder (a released encoder, a fine-tuned backbone, mimkit's "
        "encoder.safetensors): import it and initialise the rest afresh. Without it, a file that lacks "
        "tensors of the model is refused",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. num_heads=12 img_size=224",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..engine.checkpoint import atomic_save
    from ..interop import import_checkpoint

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = _value(value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = import_checkpoint(
            args.src, source=args.source, model=args.model, encoder_only=args.encoder_only, **overrides
        )
    for w in caught:
        print(f"warning: {w.message}")
    atomic_save(ckpt, args.out)
    n = sum(v.numel() for v in ckpt["model"].values())
    print(f"wrote {args.out}: {ckpt['model_name']} ({n / 1e6:.1f}M values) from {args.source} {args.src}")
    return 0
