"""`mimkit <command> ...` — each command lives in `mimkit/commands/<name>.py` with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under mimkit.commands; a module defines register(subparsers) which adds its
# parser and sets `func=run` (run(args) -> int | None).
COMMANDS = {
    "pretrain": "pretrain",
    "visualize": "visualize",
    "probe": "probe",
    "finetune": "finetune",
    "tokenizer": "tokenizer",
    "import": "import_",
    "export": "export",
    "shards": "shards",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mimkit", description="Masked image modeling: pretrain, evaluate and export vision encoders."
    )
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(f".commands.{module_name}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.commands.{module_name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"mimkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
