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
    test_fraction: float = 0.2  # folders without train/ and test/: the stratified hold-out's share
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    batch_size: int = 256
    num_workers: int = 0


class Transformed(torch.utils.data.Dataset):
    """(PIL image, label) items -> (transform(image), label)."""

    def __init__(self, base: Any, transform: Any):
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
    encoder: Any = get_encoder(model)  # beyond the contract: a ViT's patch embedding
    return encoder.patch_embed.img_size, encoder.in_chans


def model_display_name(model: nn.Module, model_key: dict) -> str:
    """The name for results: the preset's name rewritten for the config actually built (see display_name)."""
    from ..interop.loading import display_name

    name = model_key.get("model")
    config = getattr(model, "config", None)
    if name is None or config is None or not dataclasses.is_dataclass(config) or isinstance(config, type):
        return str(name)
    return display_name(name, dataclasses.asdict(config))


def load_eval_model(
    checkpoint: str | os.PathLike | None = None,
    random_init: str | None = None,
    drop_path_rate: float | None = None,
    seed: int = 0,
    **overrides: Any,
) -> tuple[nn.Module, dict]:
    """The model to evaluate and a JSON-able key that identifies it (for the feature cache and results).

    checkpoint only: the pretrained model, from any file `mimkit.load` reads (checkpoint.pt,
    encoder.safetensors, exports, classifier.pt: the encoder weights are what probes use). random_init=NAME: `create_model(NAME)` at random init (seeded);
    random_init="" with a checkpoint: the checkpoint's architecture at random init (the fair baseline).
    drop_path_rate (fine-tuning) rebuilds the model with that rate before loading the weights.
    """
    from ..interop.loading import build_method_model, read_weights
    from ..registry import create_model, model_config

    if checkpoint is None and not random_init:
        raise ValueError(
            "give --checkpoint PATH (checkpoint.pt, encoder.safetensors, an export or classifier.pt) or "
            "--random-init MODEL_NAME"
        )
    weights = read_weights(checkpoint) if checkpoint is not None else None
    if random_init or weights is None:
        name, config = random_init or "", dict(overrides)
    else:
        name, config = weights.model_name, {**weights.model_config, **overrides}
    if drop_path_rate is not None:
        fields = {f.name for f in dataclasses.fields(model_config(name))}
        if "drop_path_rate" in fields:
            config["drop_path_rate"] = drop_path_rate
        else:
            print(f"[mimkit] {name} has no drop_path_rate option; fine-tuning without drop-path")
    torch.manual_seed(seed)
    if random_init is not None:  # "" or a name: keep the random init
        model = create_model(name, **config)
        key = {
            "model": name,
            "init": "random",
            "seed": seed,
            "config": {k: str(v) for k, v in config.items()},
        }
    else:
        assert weights is not None and checkpoint is not None  # not random_init: a checkpoint was read
        model = build_method_model(weights, **config)
        key = {"model": name, "checkpoint": checkpoint_fingerprint(checkpoint)}
        if weights.kind != "model":
            key["contents"] = weights.kind
    model.eval()
    return model, key


def labelled_data(
    spec: DataSpec, img_size: Any, in_chans: int
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, list[str], int, dict[str, Any]]:
    """(train, test, class names, number of classes, how) as base datasets of (PIL image, label).

    Folders go through `mimkit.data.folder.labelled_splits` (their own train/ and test/, else a seeded,
    stratified hold-out; unlabelled images skipped); other sources use their named splits. `how` says
    which images were trained and tested on, for the result and its summary.
    """
    from ..data import build_dataset
    from ..data.folder import PATH_HINT, labelled_splits

    train: Any
    test: Any
    if spec.source == "folder":
        if spec.path is None:
            raise ValueError(f"data source 'folder' needs the folder: {PATH_HINT}")
        train, test, how = labelled_splits(
            spec.path, in_chans, spec.train_split, spec.test_split, spec.test_fraction, spec.seed,
            spec.max_train, spec.max_test,
        )  # fmt: skip
    else:
        train, test = (
            build_dataset(spec.source, spec.path, split=split, num_samples=limit, img_size=img_size,
                          in_chans=in_chans, seed=spec.seed)
            for split, limit in ((spec.train_split, spec.max_train), (spec.test_split, spec.max_test))
        )  # fmt: skip
        how = {"kind": "splits", "train_split": spec.train_split, "test_split": spec.test_split,
               "num_train": len(train), "num_test": len(test)}  # fmt: skip
    num_classes = getattr(train, "num_classes", None) or getattr(test, "num_classes", None)
    if not num_classes:
        raise ValueError(
            f"the {spec.source} data has no labels; probes need class subfolders (DIR/<class>/*.jpg) or a "
            "labelled dataset such as fashion_mnist"
        )
    names = list(getattr(train, "classes", None) or [str(i) for i in range(num_classes)])
    return train, test, names, num_classes, how


def eval_datasets(model: nn.Module, spec: DataSpec) -> tuple[Transformed, Transformed, list[str], int]:
    """(train, test, class names, number of classes) with the deterministic eval transform of the model."""
    return eval_splits(model, spec)[:4]


def eval_splits(
    model: nn.Module, spec: DataSpec
) -> tuple[Transformed, Transformed, list[str], int, dict[str, Any]]:
    """`eval_datasets` and `how` the splits were made (see `labelled_data`)."""
    from ..data import default_mean_std, eval_transform

    img_size, in_chans = model_geometry(model)
    mean, std = default_mean_std(spec.source, in_chans)
    transform = eval_transform(img_size, in_chans, spec.mean or mean, spec.std or std)
    train, test, names, num_classes, how = labelled_data(spec, img_size, in_chans)
    return Transformed(train, transform), Transformed(test, transform), names, num_classes, how


def data_warnings(
    how: dict[str, Any], num_classes: int, protocol: str, val_fraction: float = 0.1
) -> list[str]:
    """Plain-language warnings when the labelled data is too small for the figure to mean much."""
    out = []
    n_train, n_test = how["num_train"], how["num_test"]
    if n_test < 50:
        out.append(
            f"only {n_test} test images: the accuracy moves in steps of {100 / max(1, n_test):.1f} points; "
            "treat it as a smoke test, not a measurement"
        )
    if n_train < 5 * num_classes:
        out.append(f"only {n_train} training images for {num_classes} classes (fewer than 5 per class)")
    if protocol in ("linear", "attentive"):
        n_val = round(n_train * val_fraction)
        if n_val < 20:
            out.append(f"the learning rate was chosen on {n_val} held-out training images")
    return out


def data_record(spec: DataSpec, how: dict[str, Any]) -> dict[str, Any]:
    """The data spec as stored in a result: split names only where named splits were used."""
    record = dataclasses.asdict(spec)
    if how.get("kind") != "splits":
        del record["train_split"], record["test_split"]
    if how.get("kind") != "holdout":
        del record["test_fraction"]
    return record


def data_key(model: nn.Module, spec: DataSpec, split: str, limit: int | None) -> dict:
    img_size, in_chans = model_geometry(model)
    return {
        "source": spec.source,
        "path": os.path.abspath(spec.path) if spec.path else None,
        "split": split,
        "limit": limit,
        "seed": spec.seed,
        "test_fraction": spec.test_fraction if spec.source == "folder" else None,
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
) -> tuple[dict, dict, list[str], int, dict[str, Any]]:
    """Frozen features of the train and test splits (cached), class names, number of classes and how the
    splits were made."""
    train, test, names, num_classes, how = eval_splits(model, spec)
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
    return out[0], out[1], names, num_classes, how


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
    train, test, names, num_classes, how = probe_features(
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
        if bf16:  # bf16 features: the probe's forward in bf16 too
            attentive = dataclasses.replace(attentive or AttentiveProbeConfig(), precision="bf16")
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
    val_fraction = (linear or LinearProbeConfig()).val_fraction
    return {
        "protocol": protocol,
        "model": model_display_name(model, model_key),
        "model_key": model_key,
        "data": data_record(spec, how),
        "split": how,
        "warnings": data_warnings(how, num_classes, protocol, val_fraction),
        "num_train": len(train["labels"]),
        **metrics,
        **extra,
        "config": {**config, "pool": pool, "bf16": bf16},
        "feature_seconds": feature_seconds,
        "seconds": time.perf_counter() - start,
    }
