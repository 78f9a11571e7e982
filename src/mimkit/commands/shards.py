"""`mimkit shards --src FOLDER --out DIR --shard-size N`: write WebDataset-style tar shards from an image folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="write WebDataset tar shards ({key}.jpg/.png + {key}.cls) from an image folder",
        description="Pack every image under SRC (recursively; top-level subfolders are classes) into tar "
        "shards of --shard-size samples, plus index.json (sample counts, class names). Unreadable files "
        "are skipped with a warning. Train on them with data.source=shards and "
        "data.path='DIR/PREFIX-{0000..NNNN}.tar' (or the directory).",
    )
    p.add_argument("--src", required=True, help="image folder")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    p.add_argument("--no-verify", action="store_true", help="do not decode images to check them")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.shards import folder_to_shards

    index = folder_to_shards(args.src, args.out, args.shard_size, args.prefix, verify=not args.no_verify)
    n = len(index["shards"])
    last = f"{args.prefix}-{{0000..{n - 1:04d}}}.tar"
    print(
        f"wrote {index['num_samples']} samples in {n} shards to {args.out} ({index.get('skipped', 0)} skipped); "
        f"pattern: {args.out}/{last}"
    )
    return 0
