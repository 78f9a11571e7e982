"""`mimkit probe knn|linear|attentive --checkpoint run/checkpoint.pt [--data SOURCE --data-path DIR] [--out DIR]`"""

from __future__ import annotations

import argparse
import textwrap

QUICK_TRAIN, QUICK_TEST = 2000, 500


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="data source: folder, fashion_mnist, synthetic, cifar10 (default: the data the checkpoint was "
        "trained on, from its config; fashion_mnist when it records none)",
    )
    p.add_argument(
        "--data-path",
        help="folder of the data (default: the checkpoint's data.path). A folder needs class subfolders "
        "(DIR/<class>/*.jpg); DIR/train/ and DIR/test/ are used when both exist, otherwise a seeded, "
        "stratified share of each class (--test-fraction) is held out for testing",
    )
    p.add_argument("--train-split", default="train", help="train subfolder / split name")
    p.add_argument("--test-split", default="test", help="test subfolder / split name")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="folders without train/ and test/: share of each class held out for testing (seeded by --seed)",
    )
    p.add_argument("--max-train", type=int, help="use a random subset of this many training images")
    p.add_argument("--max-test", type=int, help="use a random subset of this many test images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--seed", type=int, default=0)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        help="what to evaluate: checkpoint.pt, encoder.safetensors, an export (timm / hf / safetensors) or a "
        "fine-tuned classifier.pt (anything mimkit.load reads)",
    )
    p.add_argument(
        "--random-init",
        nargs="?",
        const="",
        metavar="MODEL_NAME",
        help="evaluate a randomly initialised model: a preset name (see mimkit.list_models()), or with no "
        "name the --checkpoint's architecture (the baseline a pretrained encoder must beat)",
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="evaluate a frozen encoder: kNN, linear probe or attentive probe",
        description=textwrap.fill(
            "Frozen-encoder evaluation. Features are computed once and cached in --cache-dir; the "
            "linear probe trains many learning rates at once and reports the one chosen on held-out training data. "
            "Writes result.json, result.txt and result_confusion.png into --out. The data defaults to the data "
            "the checkpoint was trained on.",
            100,
        ),
        epilog="examples:\n"
        "  mimkit probe knn --checkpoint runs/photos/checkpoint.pt          # the folder it was trained on\n"
        "  mimkit probe linear --checkpoint runs/photos/encoder.safetensors --data folder --data-path photos/\n"
        "  mimkit probe knn --checkpoint runs/photos/checkpoint.pt --random-init   # the baseline to beat",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("protocol", choices=["knn", "linear", "attentive"])
    from .segment import add_segment_parser

    add_segment_parser(p)  # `mimkit probe segment ...`: its own options (commands/segment.py)
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/probe_<protocol>)")
    p.add_argument(
        "--cache-dir", help="feature cache folder (default: <out>/../feature_cache); 'none' disables"
    )
    p.add_argument("--pool", default="auto", choices=["auto", "cls", "mean"], help="auto: class token if any")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="features and the attentive probe under bfloat16 autocast (faster on CPU)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a fast check: {QUICK_TRAIN} training and {QUICK_TEST} test images (unless --max-* say otherwise), bf16",
    )
    p.add_argument("--k", type=int, default=20, help="kNN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    p.add_argument("--epochs", type=int, help="probe training epochs (linear 30, attentive 20)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"], help="linear probe optimizer")
    p.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        help="base lrs swept, the best chosen on held-out train data (lr = base * batch / 256); "
        "linear (SGD) default 0.001 ... 3.0, attentive (AdamW) default 1e-3 3e-3 1e-2",
    )
    p.add_argument("--heads", type=int, help="attentive probe heads (default: the encoder's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def trained_data(checkpoint) -> dict:
    """The `data` section of the training config stored with (or beside) a checkpoint, or {}."""
    if not checkpoint:
        return {}
    from ..interop.loading import read_weights

    return dict((read_weights(checkpoint).meta.get("config") or {}).get("data") or {})


def data_spec(args: argparse.Namespace):
    """The evaluation data: --data / --data-path, defaulting to what the checkpoint was trained on."""
    from ..eval.pipeline import DataSpec

    trained = trained_data(getattr(args, "checkpoint", None))
    source = args.data or trained.get("source")
    if source in (None, "shards"):
        if source == "shards":
            print("[mimkit] the checkpoint was trained on shards, which hold no labelled splits")
        source = "fashion_mnist"
        print("[mimkit] evaluating on fashion_mnist (pass --data and --data-path to choose the data)")
    same = source == trained.get("source")
    path = args.data_path or (trained.get("path") if same else None)
    max_train, max_test = args.max_train, args.max_test
    if getattr(args, "quick", False):
        max_train, max_test = max_train or QUICK_TRAIN, max_test or QUICK_TEST
    return DataSpec(
        source=source, path=path, train_split=args.train_split, test_split=args.test_split,
        max_train=max_train, max_test=max_test, seed=args.seed, batch_size=args.batch_size, num_workers=args.num_workers,
        test_fraction=args.test_fraction,
        mean=tuple(trained["mean"]) if same and trained.get("mean") else None,
        std=tuple(trained["std"]) if same and trained.get("std") else None,
    )  # fmt: skip


def pretrained_on_test_note(args: argparse.Namespace, spec, how: dict) -> str | None:
    """Say so when the encoder was pretrained (without labels) on the very folder the test images come from."""
    from pathlib import Path

    trained = trained_data(getattr(args, "checkpoint", None)) if args.random_init is None else {}
    if spec.source != "folder" or trained.get("source") != "folder" or not trained.get("path"):
        return None
    test_root = Path(how["test"]).parent if how.get("kind") == "folders" else Path(spec.path)
    if Path(trained["path"]).resolve() != test_root.resolve():
        return None
    return (
        "the encoder was pretrained (without labels) on this folder, test images included; for a strict "
        "test, pretrain on DIR/train only (data.path=DIR/train) and probe with DIR/train and DIR/test"
    )


def default_out(args: argparse.Namespace, name: str):
    from pathlib import Path

    if args.out:
        return Path(args.out)
    base = Path(args.checkpoint).parent if args.checkpoint else Path("eval")
    return base / (name + ("_random_init" if args.random_init is not None else ""))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..eval.attentive import AttentiveProbeConfig
    from ..eval.linear import LinearProbeConfig
    from ..eval.pipeline import load_eval_model, run_probe
    from ..eval.report import write_results

    model, model_key = load_eval_model(args.checkpoint, args.random_init, seed=args.seed)
    out = default_out(args, f"probe_{args.protocol}")
    cache = None if args.cache_dir == "none" else Path(args.cache_dir or out.parent / "feature_cache")
    linear = LinearProbeConfig(optimizer=args.optimizer, seed=args.seed, batch_size=args.batch_size)
    if args.epochs:
        linear.epochs = args.epochs
    attentive = AttentiveProbeConfig(num_heads=args.heads, seed=args.seed, batch_size=args.batch_size)
    if args.lrs:
        linear.base_lrs = attentive.base_lrs = tuple(args.lrs)
    if args.epochs:
        attentive.epochs = args.epochs
    spec = data_spec(args)
    result = run_probe(
        args.protocol, model, spec, model_key, cache, pool=args.pool, bf16=args.bf16 or args.quick,
        device=args.device, k=args.k, temperature=args.temperature, linear=linear, attentive=attentive,
        progress=not args.no_progress,
    )  # fmt: skip
    note = pretrained_on_test_note(args, spec, result["split"])
    if note:
        result["warnings"].append(note)
    paths = write_results(result, out)
    print(paths["summary"].read_text(), end="")
    if args.random_init is None and args.checkpoint:
        print("[mimkit] for the random-init baseline, run the same command with --random-init added")
    print(f"[mimkit] wrote {paths['json']}, {paths['summary']} and {paths['confusion']}")
    return 0
