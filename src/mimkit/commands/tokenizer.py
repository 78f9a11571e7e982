"""`mimkit tokenizer train|info`: a discrete tokenizer for CAE's token targets, trained on your images.

    mimkit tokenizer train --data fashion_mnist --img-size 32 --patch-size 4 --codebook-size 512 \\
        --steps 2000 --out tok.safetensors
    mimkit tokenizer info tok.safetensors --data fashion_mnist --img-size 32

Then set `model.target: token` and `model.tokenizer_path: tok.safetensors` in a CAE config. The tokenizer
sees the images exactly as CAE does (same transform and normalisation), so its patch size must be CAE's.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a discrete tokenizer (CAE token targets)")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")

    t = tsub.add_parser("train", help="train a VQ-VAE tokenizer (one token per patch) on a dataset")
    _data_args(t)
    t.add_argument("--patch-size", type=int, default=None, help="pixels per token side (power of 2; default 4 "
                   "below 64 px, else 16) — must equal the CAE model's patch size")  # fmt: skip
    t.add_argument("--codebook-size", type=int, default=8192)
    t.add_argument("--code-dim", type=int, default=32)
    t.add_argument("--hidden-dim", type=int, default=64)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--restart-after", type=int, default=20, help="steps unused before a code is restarted")
    t.add_argument("--device", default="cuda" if _cuda() else "cpu")
    t.add_argument("--eval-batches", type=int, default=20, help="held-out batches for the final usage report")
    t.add_argument("--out", required=True, help="output .safetensors file")
    t.set_defaults(func=run_train)

    i = tsub.add_parser("info", help="print a tokenizer's config and, with --data, its codebook usage")
    i.add_argument("path")
    _data_args(i, required=False)
    i.add_argument("--batch-size", type=int, default=128)
    i.add_argument("--eval-batches", type=int, default=20)
    i.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data", required=required, help="data source: folder | fashion_mnist | synthetic | cifar10"
    )
    p.add_argument("--data-path", default=None, help="image folder or dataset directory")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=None, help="default: 1 for fashion_mnist, else 3")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


class _Images(torch.utils.data.Dataset):
    """(PIL, label) dataset -> transformed image tensors [C, H, W]."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return self.transform(self.base[index][0])


def _loader(args, split: str, train: bool):
    """Endless-friendly loader of normalised images [B, C, H, W], the same preprocessing as pretraining."""
    import torch

    from ..data import build_dataset, build_loader, default_mean_std
    from ..data.transforms import eval_transform, pretrain_transform

    in_chans = args.in_chans or (1 if args.data == "fashion_mnist" else 3)
    try:
        base = build_dataset(args.data, args.data_path, split, img_size=args.img_size, in_chans=in_chans)
    except (ValueError, FileNotFoundError):
        if split == "train":
            raise
        base = build_dataset(args.data, args.data_path, "train", img_size=args.img_size, in_chans=in_chans)
    mean, std = default_mean_std(args.data, in_chans)
    make = pretrain_transform if train else eval_transform
    ds = _Images(base, make(args.img_size, in_chans, mean, std))
    sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(args.seed))
    return build_loader(ds, args.batch_size, args.num_workers, sampler=sampler), in_chans


def _usage(tokenizer, args) -> dict:
    import itertools

    from ..tokenizers import codebook_usage

    loader, _ = _loader(args, "test", train=False)
    device = next(tokenizer.parameters()).device
    return codebook_usage(tokenizer, (x.to(device) for x in itertools.islice(loader, args.eval_batches)))


def run_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..tokenizers import VQTokenizer, VQTokenizerConfig, save_tokenizer, train_vq_tokenizer

    loader, in_chans = _loader(args, "train", train=True)
    patch = args.patch_size or (4 if args.img_size < 64 else 16)
    config = VQTokenizerConfig(
        in_chans=in_chans, patch_size=patch, hidden_dim=args.hidden_dim, code_dim=args.code_dim,
        codebook_size=args.codebook_size, restart_after=args.restart_after,
    )  # fmt: skip
    tokenizer = VQTokenizer(config)
    bar = tqdm(total=args.steps, desc="tokenizer", unit="step", dynamic_ncols=True)

    def on_step(step: int, m: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(mse=f"{m['mse']:.4f}", ppl=f"{m['perplexity']:.0f}", dead=int(m["dead_codes"]))

    train_vq_tokenizer(tokenizer, loader, args.steps, lr=args.lr, device=args.device, on_step=on_step)
    bar.close()
    path = save_tokenizer(tokenizer, args.out)
    report = {"out": str(path), **_usage(tokenizer, args)}
    print(json.dumps(report))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..tokenizers import load_tokenizer

    tokenizer: Any = load_tokenizer(args.path)  # VQ or DALL-E: kind, codebook_size (+ config_dict for VQ)
    info = {
        "kind": tokenizer.kind,
        "codebook_size": tokenizer.codebook_size,
        **(tokenizer.config_dict() if hasattr(tokenizer, "config_dict") else {}),
    }
    if args.data:
        info |= _usage(tokenizer, args)
    print(json.dumps(info))
    return 0
