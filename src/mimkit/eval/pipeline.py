"""End-to-end evaluation: load a model, load labelled train/test data, cache features, run a protocol.

Shared by `mimkit probe`, `mimkit finetune` and benchmarks/quality.py.

    from mimkit.eval.pipeline import DataSpec, load_eval_model, run_probe
    model, model_key = load_eval_model("run/checkpoint.pt")
    result = run_probe("knn", model, DataSpec("fashion_mnist"), model_key, cache_dir="run/eval_cache")
    print(result["accuracy"])
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attentive import AttentiveProbeConfig, encoder_num_heads, train_attentive_probe
from .features import cached_features, checkpoint_fingerprint, get_encoder
from .knn import knn_classify
from .linear import LinearProbeConfig, train_linear_probe
from .report import classification_metrics

PROTOCOLS = ("knn", "linear", "attentive")


@dataclass
class DataSpec:
    """Labelled data for evaluation: a source of build_dataset with a train split (probe training / kNN
    memory) and a test split (reported accuracy); max_* keep a seeded random subset."""

    source: str = "fashion_mnist"
    path: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    max_train: int | None = None
    max_test: int | None = None
    seed: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    batch_size: int = 256
    num_workers: int = 0


class Transformed(torch.utils.data.Dataset):
    """(PIL image, label) items -> (transform(image), label)."""

    def __init__(self, base: torch.utils.data.Dataset, transform):
        self.base, self.transform = base, transform
        self.classes = getattr(base, "classes", None)
        self.num_classes = getattr(base, "num_classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img, label = self.base[index]
        return self.transform(img), label


def model_geometry(model: nn.Module) -> tuple[Any, int]:
    """(img_size, in_chans) the model was built for."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "img_size") and hasattr(config, "in_chans"):
        return config.img_size, config.in_chans
    encoder = get_encoder(model)
    return encoder.patch_embed.img_size, encoder.in_chans


def load_eval_model(
    checkpoint: str | os.PathLike | None = None,
    random_init: str | None = None,
    drop_path_rate: float | None = None,
    seed: int = 0,
    **overrides: Any,
) -> tuple[nn.Module, dict]:
    """The model to evaluate and a JSON-able key that identifies it (for the feature cache and results).

    checkpoint only: the pretrained model. random_init=NAME: `create_model(NAME)` at random init (seeded);
    random_init="" with a checkpoint: the checkpoint's architecture at random init (the fair baseline).
    drop_path_rate (fine-tuning) rebuilds the model with that rate before loading the weights.
    """
    from ..engine.checkpoint import load_checkpoint
    from ..registry import create_model, model_config

    if checkpoint is None and not random_init:
        raise ValueError(
            "give --checkpoint PATH (a pretrained mimkit checkpoint) or --random-init MODEL_NAME"
        )
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.get("format") != "mimkit/1":
        raise ValueError(
            f"{checkpoint} is not a mimkit checkpoint; convert foreign checkpoints with `mimkit import`"
        )
    if random_init:
        name, config = random_init, dict(overrides)
    else:
        name, config = ckpt["model_name"], {**ckpt["model_config"], **overrides}
    if drop_path_rate is not None:
        fields = {f.name for f in dataclasses.fields(model_config(name))}
        if "drop_path_rate" in fields:
            config["drop_path_rate"] = drop_path_rate
        else:
            print(f"[mimkit] {name} has no drop_path_rate option; fine-tuning without drop-path")
    torch.manual_seed(seed)
    model = create_model(name, **config)
    if random_init is not None:  # "" or a name: keep the random init
        key = {
            "model": name,
            "init": "random",
            "seed": seed,
            "config": {k: str(v) for k, v in config.items()},
        }
    else:
        model.load_state_dict(ckpt["model"], strict=True)
        key = {"model": name, "checkpoint": checkpoint_fingerprint(checkpoint)}
    model.eval()
    return model, key


def eval_datasets(model: nn.Module, spec: DataSpec) -> tuple[Transformed, Transformed, list[str], int]:
    """(train, test, class names, number of classes) with the deterministic eval transform of the model."""
    from ..data import build_dataset, default_mean_std, eval_transform

    img_size, in_chans = model_geometry(model)
    mean, std = default_mean_std(spec.source, in_chans)
    transform = eval_transform(img_size, in_chans, spec.mean or mean, spec.std or std)
    splits = []
    for split, limit in ((spec.train_split, spec.max_train), (spec.test_split, spec.max_test)):
        base = build_dataset(
            spec.source,
            spec.path,
            split=split,
            num_samples=limit,
            img_size=img_size,
            in_chans=in_chans,
            seed=spec.seed,
        )
        splits.append(Transformed(base, transform))
    train, test = splits
    num_classes = train.num_classes or test.num_classes
    if not num_classes:
        raise ValueError(
            f"the {spec.source} data has no labels; probes need class subfolders (path/<class>/*.png) or a "
            "labelled dataset such as fashion_mnist"
        )
    names = list(train.classes or test.classes or [str(i) for i in range(num_classes)])
    return train, test, names, num_classes


def data_key(model: nn.Module, spec: DataSpec, split: str, limit: int | None) -> dict:
    img_size, in_chans = model_geometry(model)
    return {
        "source": spec.source,
        "path": os.path.abspath(spec.path) if spec.path else None,
        "split": split,
        "limit": limit,
        "seed": spec.seed,
        "img_size": str(img_size),
        "in_chans": in_chans,
        "mean": spec.mean,
        "std": spec.std,
    }


def probe_features(
    model: nn.Module,
    spec: DataSpec,
    model_key: dict,
    cache_dir: str | os.PathLike | None = None,
    pool: str = "auto",
    keep_tokens: bool = False,
    bf16: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[dict, dict, list[str], int]:
    """Frozen features of the train and test splits (cached), class names and number of classes."""
    train, test, names, num_classes = eval_datasets(model, spec)
    encoder = get_encoder(model).to(device)
    out = []
    for split, limit, ds in (
        (spec.train_split, spec.max_train, train),
        (spec.test_split, spec.max_test, test),
    ):
        key = {"model": model_key, "data": data_key(model, spec, split, limit), "bf16": bf16}
        out.append(
            cached_features(
                encoder,
                ds,
                cache_dir,
                key,
                keep_tokens=keep_tokens,
                pool=pool,
                batch_size=spec.batch_size,
                num_workers=spec.num_workers,
                device=device,
                bf16=bf16,
                progress=progress,
                desc=f"features {split}",
            )  # fmt: skip
        )
    return out[0], out[1], names, num_classes


def run_probe(
    protocol: str,
    model: nn.Module,
    spec: DataSpec,
    model_key: dict,
    cache_dir: str | os.PathLike | None = None,
    pool: str = "auto",
    bf16: bool = False,
    device: str = "cpu",
    k: int = 20,
    temperature: float = 0.07,
    linear: LinearProbeConfig | None = None,
    attentive: AttentiveProbeConfig | None = None,
    progress: bool = True,
) -> dict:
    """Run one protocol ("knn", "linear", "attentive") and return the result dict (JSON-able)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    start = time.perf_counter()
    train, test, names, num_classes = probe_features(
        model, spec, model_key, cache_dir, pool, protocol == "attentive", bf16, device, progress
    )
    feature_seconds = time.perf_counter() - start
    extra: dict[str, Any] = {}
    if protocol == "knn":
        _, preds = knn_classify(
            train["features"], train["labels"], test["features"], test["labels"], k, temperature, num_classes
        )
        config = {"k": k, "temperature": temperature}
    elif protocol == "linear":
        res = train_linear_probe(
            train["features"],
            train["labels"],
            test["features"],
            test["labels"],
            num_classes,
            linear,
            progress,
        )
        preds, config = res.predictions, res.config
        extra = {
            "best_lr": res.best_lr,
            "best_base_lr": res.best_base_lr,
            "val_accuracy": res.val_accuracy,
            "per_lr": res.per_lr,
        }
    else:
        heads = encoder_num_heads(get_encoder(model), train["tokens"].shape[-1])
        res = train_attentive_probe(
            train["tokens"],
            train["labels"],
            test["tokens"],
            test["labels"],
            num_classes,
            attentive,
            heads,
            progress,
        )
        preds, config = res.predictions, res.config
        extra = {
            "best_lr": res.best_lr,
            "best_base_lr": res.best_base_lr,
            "val_accuracy": res.val_accuracy,
            "per_lr": res.per_lr,
        }
    metrics = classification_metrics(preds, test["labels"], num_classes, names)
    return {
        "protocol": protocol,
        "model": model_key.get("model"),
        "model_key": model_key,
        "data": dataclasses.asdict(spec),
        "num_train": len(train["labels"]),
        **metrics,
        **extra,
        "config": {**config, "pool": pool, "bf16": bf16},
        "feature_seconds": feature_seconds,
        "seconds": time.perf_counter() - start,
    }
