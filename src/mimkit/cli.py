"""`mimkit <command> ...` — each command lives in `mimkit/commands/<name>.py` with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import MimkitError, one_line

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
    "list-models": "list_models",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mimkit", description="Masked image modeling: pretrain, evaluate and export vision encoders."
    )
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():  # a missing or broken command module is an error, never skipped
        importlib.import_module(f".commands.{module_name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error (bad config, unreadable input, unwritable output) is one line on stderr
    and exit status 2, an interruption exit status 130. MIMKIT_TRACEBACK=1 shows the traceback instead."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `section.key=value` overrides may follow a flag (argparse stops at the first flag)
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if os.environ.get("MIMKIT_TRACEBACK"):
            raise
        print(f"mimkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MimkitError, ValueError, OSError) as e:
        if os.environ.get("MIMKIT_TRACEBACK"):
            raise
        print(f"mimkit {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
