"""`mimkit visualize --checkpoint run/checkpoint.pt [--out recon.png]` (default: beside the checkpoint)"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="write a PNG grid: original | masked | reconstruction | reconstruction + visible patches",
        description="Reconstruct held-out images (the test split when there is one) with seeded masks and "
        "save the picture, by default as reconstructions.png in the checkpoint's folder.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a whole-model file: pretrain's checkpoint.pt, an import, or an hf / safetensors export "
        "(encoder-only files have no decoder to reconstruct with)",
    )
    p.add_argument(
        "--data", default=None, help="data source (default: the one the checkpoint was trained on)"
    )
    p.add_argument("--data-path", default=None, help="folder or dataset directory")
    p.add_argument("--split", default=None, help="split to draw images from (default: test if it exists)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=None, help="override the model's mask ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG path (default: <checkpoint folder>/reconstructions.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..interop.loading import build_method_model, read_weights

    weights = read_weights(args.checkpoint)
    if weights.kind != "model":
        raise ValueError(
            f"{args.checkpoint} holds the {weights.kind} only, without the decoder that reconstructs images; "
            "pass the whole model (pretrain's checkpoint.pt)"
        )
    overrides = {"mask_ratio": args.mask_ratio} if args.mask_ratio is not None else {}
    model = build_method_model(weights, **overrides)
    data_cfg = (weights.meta.get("config") or {}).get("data", {})
    source = args.data or data_cfg.get("source") or "fashion_mnist"
    path = args.data_path or (data_cfg.get("path") if source == data_cfg.get("source") else None)
    where = Path(args.checkpoint)
    out_path = args.out or (where if where.is_dir() else where.parent) / "reconstructions.png"
    same = source == data_cfg.get("source")
    out = visualize_model(
        model, source, path, out_path, num_images=args.num_images, split=args.split, seed=args.seed,
        mean=data_cfg.get("mean") if same else None, std=data_cfg.get("std") if same else None,
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


def visualize_model(
    model, source: str, path, out_path, num_images: int = 8, split: str | None = None, seed: int = 0,
    mean=None, std=None,
) -> Path:  # fmt: skip
    """Reconstruct `num_images` held-out images (seeded masks) and save the picture grid."""
    from ..data import build_dataset, default_mean_std, eval_transform
    from ..protocols import ExtraReconstructions
    from ..viz import reconstruction_grid, save_reconstructions

    c = model.config
    split = split or "test"
    try:
        base = build_dataset(
            source, path=path, split=split, img_size=c.img_size, in_chans=c.in_chans, seed=seed
        )
    except (ValueError, FileNotFoundError):
        base = build_dataset(
            source, path=path, split="train", img_size=c.img_size, in_chans=c.in_chans, seed=seed
        )
    d_mean, d_std = default_mean_std(source, c.in_chans)
    mean, std = mean or d_mean, std or d_std
    transform = eval_transform(c.img_size, c.in_chans, mean, std, crop_pct=1.0)
    step = max(1, len(base) // num_images)
    images = torch.stack([transform(base[i * step][0]) for i in range(min(num_images, len(base)))])
    device = next(model.parameters()).device
    images = images.to(device)
    mask = model.mask_generator(images.shape[0], generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = model.training
    model.eval()
    extra = model.extra_reconstructions(images, mask) if isinstance(model, ExtraReconstructions) else None
    titles, rows = reconstruction_grid(model, images, mask, mean, std, extra=extra)
    model.train(was_training)
    return save_reconstructions(titles, rows, out_path)
