"""`mimkit finetune --checkpoint run/checkpoint.pt [--data SOURCE --data-path DIR] [--blocks k] [--out DIR]`"""

from __future__ import annotations

import argparse
import json

from .probe import add_data_args, add_model_args, data_spec, default_out, pretrained_on_test_note


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune an encoder with a classification head (full, or only the last k blocks)",
        description="Fine-tuning (SPEC §6): mean-pooled tokens + fresh LayerNorm + Linear head; AdamW with "
        "layer-wise lr decay, drop-path, Mixup/CutMix, RandAugment, label smoothing. --blocks k trains only the "
        "last k blocks and the head (k = 0: a linear probe on pooled tokens). Writes result.json, result.txt, "
        "result_confusion.png and classifier.pt (load it with mimkit.load) into --out. The data defaults to the data the "
        "checkpoint was trained on; folders are split as by `mimkit probe`.",
    )
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/finetune[_blocksK])")
    p.add_argument(
        "--blocks", type=int, help="partial fine-tuning: train only the last k blocks (default: all)"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="base lr; lr = base * batch / 256")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--layer-decay", type=float, default=0.75)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32",
        help="bf16: the forward under bf16 autocast (2-6x faster on CPUs with bf16 matmuls)",
    )  # fmt: skip
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0 = off)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--no-randaug", action="store_true")
    p.add_argument(
        "--crop-min", type=float, default=0.25, help="smallest area of the random-resized crops (0-1)"
    )
    p.add_argument(
        "--lp-epochs", type=int, default=0,
        help="LP-FT: train the head alone this many epochs first (encoder frozen); helps with few labels",
    )  # fmt: skip
    p.add_argument("--lp-lr", type=float, default=0.1, help="base lr of the --lp-epochs phase")
    p.add_argument("--clip-grad", type=float)
    p.add_argument(
        "--max-minutes", type=float, help="stop training after this many minutes (schedule unchanged)"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, batch_size=64)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..data import default_mean_std
    from ..engine.checkpoint import atomic_save
    from ..eval.finetune import FinetuneClassifier, FinetuneConfig, finetune, finetune_transform
    from ..eval.pipeline import (
        Transformed,
        data_record,
        data_warnings,
        eval_splits,
        labelled_data,
        load_eval_model,
        model_display_name,
        model_geometry,
    )
    from ..eval.report import classification_metrics, write_results
    from ..interop.loading import CLASSIFIER_FORMAT, preprocessing
    from ..protocols import as_method

    cfg = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, base_lr=args.lr, weight_decay=args.weight_decay,
        layer_decay=args.layer_decay, warmup_epochs=args.warmup_epochs, drop_path_rate=args.drop_path,
        mixup=args.mixup, cutmix=args.cutmix, label_smoothing=args.smoothing, randaug=not args.no_randaug,
        blocks=args.blocks, clip_grad=args.clip_grad, max_minutes=args.max_minutes, num_workers=args.num_workers,
        seed=args.seed, precision=args.precision, crop_scale=(args.crop_min, 1.0),
        linear_probe_epochs=args.lp_epochs, linear_probe_lr=args.lp_lr,
    )  # fmt: skip
    model, model_key = load_eval_model(
        args.checkpoint, args.random_init, drop_path_rate=cfg.drop_path_rate, seed=args.seed
    )
    spec = data_spec(args)
    _, test, names, num_classes, how = eval_splits(model, spec)  # test split: deterministic eval transform
    img_size, in_chans = model_geometry(model)
    default_mean, default_std = default_mean_std(spec.source, in_chans)
    mean, std = spec.mean or default_mean, spec.std or default_std
    train_base = labelled_data(spec, img_size, in_chans)[0]  # the same split, augmented for training
    train = Transformed(train_base, finetune_transform(img_size, in_chans, mean, std, cfg))
    classifier = FinetuneClassifier(model, num_classes)
    out_dir = default_out(args, "finetune" if args.blocks is None else f"finetune_blocks{args.blocks}")
    res = finetune(
        classifier, train, test, num_classes, cfg, device=args.device, progress=not args.no_progress
    )
    metrics = classification_metrics(res["predictions"], res["labels"], num_classes, names)
    result = {
        "protocol": "finetune" if args.blocks is None else f"partial finetune (last {args.blocks} blocks)",
        "model": model_display_name(model, model_key),
        "model_key": model_key,
        "data": data_record(spec, how),
        "split": how,
        "warnings": data_warnings(how, num_classes, "finetune")
        + [n for n in [pretrained_on_test_note(args, spec, how)] if n],
        "num_train": len(train),
        **metrics,
        "history": res["history"],
        "trainable_parameters": sum(p.numel() for p in classifier.parameters() if p.requires_grad),
        "config": res["config"],
        "seconds": res["seconds"],
    }
    paths = write_results(result, out_dir)
    model_config = dataclasses.asdict(as_method(model).config)
    classifier_file = {
        "format": CLASSIFIER_FORMAT,
        "model_name": model_key.get("model"),
        "model_config": model_config,
        "num_classes": num_classes,
        "class_names": names,
        "preprocessing": preprocessing(model_config, {"source": spec.source, "mean": mean, "std": std}),
        "model_key": json.dumps(model_key, default=str),
        "accuracy": result["accuracy"],
        "model": {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
    }
    atomic_save(classifier_file, out_dir / "classifier.pt")
    print(paths["summary"].read_text(), end="")
    print(
        f"[mimkit] wrote {paths['json']}, {paths['summary']}, {paths['confusion']} and {out_dir / 'classifier.pt'}"
        f"\n[mimkit] load the classifier with mimkit.load({str(out_dir / 'classifier.pt')!r}); export it with "
        f"`mimkit export --format safetensors --checkpoint {out_dir / 'classifier.pt'} --out classifier`"
    )
    return 0
