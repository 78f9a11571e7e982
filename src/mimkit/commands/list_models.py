"""`mimkit list-models [PATTERN]`: the registered presets and what they are, and the recipes that use them."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list-models",
        help="list the model presets (name, method, input size, patch, width, depth) and the shipped recipes",
        description="Every preset can be re-sized in a recipe's model section or on the command line, e.g. "
        "`mimkit pretrain --config configs/mae_photos_cpu.yaml model.img_size=96 model.depth=4`.",
    )
    p.add_argument("pattern", nargs="?", default="*", help="glob on the name, e.g. 'mae_*' (default: all)")
    p.set_defaults(func=run)


def _describe(name: str) -> tuple[str, ...]:
    from ..registry import model_config

    c = model_config(name)
    method = name.split("_")[0]
    depth = "/".join(str(d) for d in c.depths) if hasattr(c, "depths") else str(c.depth)
    img = c.img_size if isinstance(c.img_size, int) else "x".join(str(v) for v in c.img_size)
    return name, method, f"{img} px", f"patch {c.patch_size}", f"width {c.embed_dim}", f"depth {depth}"


def recipes_dir() -> Path | None:
    """configs/ of a source checkout (the package is installed from it with `pip install -e .`)."""
    candidate = Path(__file__).resolve().parents[3] / "configs"
    return candidate if candidate.is_dir() else None


def run(args: argparse.Namespace) -> int:
    from ..registry import list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}; `mimkit list-models` lists them all")
        return 1
    rows = [_describe(n) for n in names]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    folder = recipes_dir()
    if folder is not None:
        recipes = sorted(p.name for p in folder.glob("*.yaml"))
        print(f"\nrecipes in {folder} (mimkit pretrain --config {folder.name}/NAME): {', '.join(recipes)}")
    print(
        "\nmodels load with mimkit.create_model(name, **overrides); see also mimkit.load(path) for saved ones"
    )
    return 0
