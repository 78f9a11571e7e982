"""Frozen-encoder features, computed once and cached on disk so every probe re-uses them.

Any encoder that follows the encoder contract (docs/design.md) works: `forward_features(images)` ->
[B, num_prefix_tokens + L, D]. Pooling "cls" takes the class token, "mean" the mean of the patch tokens
(prefix tokens excluded), "auto" picks "cls" when the encoder has a class token and "mean" otherwise (ConvMAE).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.checkpoint import atomic_save
from ..protocols import Encoder

POOLS = ("auto", "cls", "mean")


def get_encoder(model: nn.Module) -> Encoder:
    """The encoder of a method model (`model.encoder`), or the model itself when it is already an encoder
    (both checked against the encoder contract, `mimkit.protocols.Encoder`)."""
    inner = model._modules.get("encoder")
    if isinstance(inner, Encoder):
        return inner
    if isinstance(model, Encoder):
        return model
    raise ValueError(
        f"{type(model).__name__} is neither a mimkit method (with .encoder) nor an encoder (with "
        ".forward_features); load it with mimkit.engine.model_from_checkpoint or mimkit.create_model"
    )


def resolve_pool(encoder: Encoder, pool: str) -> str:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    prefix = encoder.num_prefix_tokens
    if pool == "auto":
        return "cls" if prefix > 0 else "mean"
    if pool == "cls" and prefix == 0:
        raise ValueError(
            f"{type(encoder).__name__} has no class token (num_prefix_tokens=0); use pool='mean' (or 'auto')"
        )
    return pool


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pool: str) -> torch.Tensor:
    """[B, P + L, D] encoder output -> [B, D]: class token ("cls") or mean of the L patch tokens ("mean")."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean' here, got {pool!r}")


def _batches(data: Any, batch_size: int, num_workers: int) -> Iterable:
    """(images [N, C, H, W], labels [N]) tensors, a Dataset of (image tensor, label), or a DataLoader."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
        labels = torch.as_tensor(labels)
        return [
            (images[i : i + batch_size], labels[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    data: Any,
    pool: str = "auto",
    keep_tokens: bool = False,
    token_dtype: torch.dtype = torch.float16,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    progress: bool = True,
    desc: str = "features",
) -> dict[str, torch.Tensor]:
    """Run the frozen encoder once over `data`.

    Returns {"features": [N, D] float32 pooled, "labels": [N] int64} and, with keep_tokens, "tokens":
    [N, P + L, D] in `token_dtype` (the attentive probe's input). The encoder is put in eval mode for the
    pass (dropout / drop-path off, BatchNorm uses its running stats and never updates them) and its previous
    mode is restored afterwards; no gradient is recorded.
    """
    net = get_encoder(encoder)
    pool = resolve_pool(net, pool)
    prefix = net.num_prefix_tokens
    device = torch.device(device)
    was_training = net.training
    net.eval()
    feats, labels, tokens = [], [], []
    batches = _batches(data, batch_size, num_workers)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    try:
        for batch in batches:
            images, y = batch[0], batch[-1]  # MIMDataset items are (image, mask, label)
            with autocast:
                out = net.forward_features(images.to(device, non_blocking=True))  # [B, P + L, D]
            out = out.float()
            feats.append(pool_tokens(out, prefix, pool).cpu())
            labels.append(torch.as_tensor(y).long().cpu())
            if keep_tokens:
                tokens.append(out.to(token_dtype).cpu())
    finally:
        net.train(was_training)
    result = {"features": torch.cat(feats), "labels": torch.cat(labels)}
    if keep_tokens:
        result["tokens"] = torch.cat(tokens)
    return result


def checkpoint_fingerprint(path: str | os.PathLike) -> dict:
    """Identifies a checkpoint file's content cheaply: absolute path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(**parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (checkpoint fingerprint, data, transform, pooling)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _load_cache(path: Path) -> dict[str, torch.Tensor] | None:
    """A feature cache file's content, or None (with a warning) when it is unreadable, not a mimkit cache or
    inconsistent: a damaged or planted cache is a cache miss, rebuilt and overwritten, never an error. Loading
    is weights_only, so a planted pickle runs no code."""
    try:
        with warnings.catch_warnings():  # torch's own notes on odd pickles: the one warning below says it
            warnings.simplefilter("ignore")
            cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError, EOFError, RuntimeError (zip), OSError ...
        reason = f"{type(err).__name__}: {str(err).split('. ')[0][:120]}"
    else:
        features, labels = (
            cached.get(k) if isinstance(cached, dict) else None for k in ("features", "labels")
        )
        tokens = cached.get("tokens") if isinstance(cached, dict) else None
        if (
            isinstance(features, torch.Tensor)
            and isinstance(labels, torch.Tensor)
            and features.ndim == 2
            and len(features) == len(labels)
            and (tokens is None or (isinstance(tokens, torch.Tensor) and len(tokens) == len(labels)))
        ):
            return cached
        reason = "not a feature cache written by mimkit"
    warnings.warn(
        f"ignoring the feature cache {path} ({reason[:200]}); computing the features again",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def cached_features(
    encoder: nn.Module,
    data: Any,
    cache_dir: str | os.PathLike | None,
    key: dict,
    keep_tokens: bool = False,
    verbose: bool = True,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """`extract_features`, stored in `cache_dir/features-<hash(key)>.pt` and loaded from there next time.

    `key` must describe everything the features depend on (checkpoint fingerprint, data source / split /
    subset, transform, pooling); `keep_tokens` and `pool` are added to it here. cache_dir None = no cache.
    A cache without tokens is not re-used when tokens are asked for.
    """
    pool = kwargs.get("pool", "auto")
    name = f"features-{cache_key(**key, pool=pool)}.pt"
    path = Path(cache_dir) / name if cache_dir is not None else None
    cached = _load_cache(path) if path is not None and path.is_file() else None
    if cached is not None:
        if not keep_tokens or "tokens" in cached:
            if verbose:
                print(f"features: re-using {path}")
            return cached
    result = extract_features(encoder, data, keep_tokens=keep_tokens, **kwargs)
    if path is not None:
        atomic_save({**result, "key": json.dumps(key, sort_keys=True, default=str)}, path)
    return result
