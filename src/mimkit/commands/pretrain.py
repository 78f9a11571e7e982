"""`mimkit pretrain --config configs/X.yaml [section.key=value ...]`"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain an encoder (MAE / CAE / ConvMAE) on a folder of images or a known dataset",
        description="Pretrain with a YAML recipe; any key can be overridden as section.key=value, e.g. "
        "`mimkit pretrain --config configs/mae_tiny_fmnist.yaml train.max_steps=200 data.batch_size=128`. "
        "Launch under torchrun for several processes/GPUs/nodes.",
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults are used for what it omits")
    p.add_argument("--output-dir", help="run directory (train.output_dir)")
    p.add_argument("--resume", help="checkpoint path, or 'auto' for <output-dir>/checkpoint.pt")
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even when batch size, seed or model differ from the checkpoint's (train.resume_force)",
    )
    p.add_argument("--no-pictures", action="store_true", help="skip the loss curve and reconstruction PNGs")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=run)


def _keys_help() -> str:
    """Every data/optim/train key with its default, and where the model keys and recipes are listed."""
    import dataclasses

    from ..engine.config import SECTIONS

    lines = ["config keys (section.key=value; defaults shown):"]
    for section, cls in SECTIONS.items():
        fields = [f"{f.name}={_default(f)}" for f in dataclasses.fields(cls)]
        lines.append(f"  {section}: " + ", ".join(fields))
    lines += [
        "  model: name=<preset> plus any field of the method's config (img_size, in_chans, depth, mask_ratio, ...);",
        "         `mimkit list-models` lists the presets and their fields",
        "recipes: configs/*_pretrain.yaml (the papers' ImageNet recipes), configs/*_tiny_fmnist.yaml (CPU,",
        "Fashion-MNIST), configs/mae_photos_cpu.yaml (your own photos on a CPU: data.path=DIR)",
    ]
    return "\n".join(lines)


def _default(field) -> object:
    import dataclasses

    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else "?"


def run(args: argparse.Namespace) -> int:
    """0 when the run finished; 128 + signal number (130 SIGINT, 143 SIGTERM) when a signal stopped it after
    writing a checkpoint; errors in the config or the data are raised as MimkitError (the CLI prints them)."""
    from ..engine.config import load_config
    from ..engine.trainer import Trainer

    overrides = list(args.overrides)
    if args.output_dir:  # JSON strings are YAML: any folder name survives the override parser
        overrides.append(f"train.output_dir={json.dumps(args.output_dir)}")
    if args.resume:
        overrides.append(f"train.resume={json.dumps(args.resume)}")
    if args.force_resume:
        overrides.append("train.resume_force=true")
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg)
    try:
        stats = trainer.fit()
        if trainer.stopped_by is not None:
            return 128 + trainer.stopped_by
        if trainer.dist.is_main and not args.no_pictures:
            write_pictures(trainer)
        if trainer.dist.is_main:
            print(
                f"[mimkit] done: final loss {stats.get('loss', float('nan')):.4f}; outputs in {trainer.out_dir}"
            )
    finally:
        trainer.close()
    return 0


def write_pictures(trainer) -> None:
    """loss_curve.png from metrics.jsonl and reconstructions.png on held-out images."""
    from ..viz import plot_loss_curve
    from .visualize import visualize_model

    out = trainer.out_dir
    plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
    c = trainer.cfg.data
    try:
        path = visualize_model(
            trainer.model, c.source, c.path, out / "reconstructions.png", mean=c.mean, std=c.std,
            seed=trainer.cfg.train.seed,
        )  # fmt: skip
        print(f"[mimkit] wrote {out / 'loss_curve.png'} and {path}")
        from ..viz import log_run_pictures

        log_run_pictures(out, trainer.step)  # the pictures and the config in TensorBoard too
    except ValueError as e:  # e.g. token targets have no pixel picture
        print(f"[mimkit] no reconstruction picture: {e}")
