"""Semantic segmentation check: a frozen encoder (or its last k blocks tuned) + a light head, mIoU and pixel
accuracy on a dense task.

Heads (both read the encoder through `mimkit.dense`, i.e. timm's feature contract):

- "linear": per-patch linear head. BatchNorm (no affine) + one 1x1 conv from the encoder's last map
  (stride r) to K * r * r logits, pixel-shuffled to full resolution: each token predicts the classes of its
  own r x r pixels, nothing else mixes tokens (the dense analogue of the linear probe).
- "fpn": a small UperNet-style head over the 4-level pyramid (ViTDet's simple pyramid for plain ViTs,
  ConvMAE's native one; levels finer than `min_stride`, 2 by default, are left out: a patch-4 ViT's
  stride-1 level costs more than the rest of the head): top-down FPN merging (nearest 2x upsampling + sum,
  a 3x3 conv per level), every level upsampled to the finest and concatenated, a 1x1 conv + LayerNorm +
  GELU, a 1x1 classifier, bilinear upsampling to the image.

With several learning rates (`lrs`), one head per lr trains on the training images minus a held-out share
(`val_fraction`) and the best on that share is reported (as mimkit's linear probe chooses its lr). With a
frozen encoder (`tune_blocks=0`) its maps are computed once (stored in float16) and the heads train on them;
with `tune_blocks=k` the parameters of the last k blocks and the final norm (the encoder's `layer_id` >
depth - k) train too, at `encoder_lr`, and the encoder runs at every step.
Metrics: confusion matrix over every labelled test pixel (255 = ignore); IoU_c = TP / (TP + FP + FN),
mIoU = the mean over classes present in the ground truth or the predictions; pixel accuracy = TP / pixels.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.segmentation import IGNORE_INDEX
from ..dense import build_neck, conv_ln, encoder_maps, map_specs
from ..protocols import Encoder

HEADS = ("linear", "fpn")
HEAD_LRS = {"linear": 1e-2, "fpn": 3e-3}  # AdamW peak lrs from a short sweep (600 / 200 canvases, 8 epochs)


class LinearSegHead(nn.Module):
    """[B, C, h, w] map at stride r -> [B, K, h*r, w*r] logits; each token predicts its own r x r pixels."""

    def __init__(self, in_channels: int, stride: int, num_classes: int):
        super().__init__()
        self.stride = stride
        self.bn = nn.BatchNorm2d(in_channels, affine=False)
        self.proj = nn.Conv2d(in_channels, num_classes * stride * stride, 1)
        nn.init.normal_(self.proj.weight, std=0.01)  # as linear probes: start near uniform predictions
        nn.init.zeros_(cast(torch.Tensor, self.proj.bias))  # a 1x1 conv with bias

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return F.pixel_shuffle(self.proj(self.bn(maps[-1].float())), self.stride)


class FPNSegHead(nn.Module):
    """Pyramid neck + top-down FPN + fuse + classifier; see the module doc. Logits at the finest level."""

    def __init__(self, encoder: nn.Module, num_classes: int, channels: int = 64, min_stride: int = 2):
        super().__init__()
        self.neck = build_neck(encoder, channels, min_stride)
        n = len(cast(list[int], self.neck.strides))
        self.smooth = nn.ModuleList(conv_ln(channels, channels, 3) for _ in range(n - 1))
        self.fuse = nn.Sequential(conv_ln(n * channels, channels, 1), nn.GELU())
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        levels = list(self.neck([m.float() for m in maps]).values())  # finest first
        merged = [levels[-1]]
        for level, smooth in zip(reversed(levels[:-1]), reversed(self.smooth)):
            top = F.interpolate(merged[0], size=level.shape[-2:], mode="nearest")
            merged.insert(0, smooth(level + top))
        size = merged[0].shape[-2:]
        stacked = torch.cat([merged[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                                           for m in merged[1:]], dim=1)  # fmt: skip
        return self.classifier(self.fuse(stacked))


def build_head(
    kind: str, encoder: nn.Module, num_classes: int, channels: int = 64, min_stride: int = 2
) -> nn.Module:
    if kind == "linear":
        in_channels, stride = map_specs(encoder)[-1]
        return LinearSegHead(in_channels, stride, num_classes)
    if kind == "fpn":
        return FPNSegHead(encoder, num_classes, channels, min_stride)
    raise ValueError(f"segmentation head must be one of {HEADS}, got {kind!r}")


@dataclasses.dataclass
class SegmentationConfig:
    head: str = "fpn"
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # AdamW peak lr, cosine to 0 over the run; None: HEAD_LRS[head]
    lrs: tuple[float, ...] | None = None  # several: one head each, the best on held-out training images kept
    val_fraction: float = 0.1  # share of the training images held out to choose among `lrs`
    weight_decay: float = 1e-4
    channels: int = 64  # FPN / pyramid width
    min_stride: int = 2  # FPN: pyramid levels finer than this are left out (a patch-4 ViT's stride 1)
    tune_blocks: int = 0
    encoder_lr: float = 1e-4
    seed: int = 0


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] counts, rows = ground truth, columns = prediction; pixels labelled 255 are left out."""
    keep = target != IGNORE_INDEX
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor, class_names: list[str] | None = None) -> dict[str, Any]:
    """mIoU (over classes in ground truth or predictions), pixel accuracy and per-class IoU from [K, K]."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    names = class_names or [str(i) for i in range(len(tp))]
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else 0.0,
        "pixel_accuracy": float(tp.sum() / conf.sum().clamp(min=1)),
        "iou": {n: (None if math.isnan(v) else round(float(v), 4)) for n, v in zip(names, iou.tolist())},
        "pixels": int(conf.sum()),
    }


class DenseData:
    """Transformed pairs held in memory: images [N, C, H, W] float32, masks [N, H, W] int64."""

    def __init__(self, dataset, transform, limit: int | None = None):
        n = len(dataset) if limit is None else min(limit, len(dataset))
        pairs = [transform(*dataset[i]) for i in range(n)]
        self.images = torch.stack([p[0] for p in pairs])
        self.masks = torch.stack([p[1] for p in pairs])

    def __len__(self) -> int:
        return len(self.masks)


def _maps_in_batches(encoder: nn.Module, images: torch.Tensor, batch_size: int, device) -> list[torch.Tensor]:
    """The encoder's maps for every image, computed once without grad and kept in float16 on the CPU."""
    chunks: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            maps = encoder_maps(encoder, images[start : start + batch_size].to(device))
            chunks.append([m.to("cpu", torch.float16) for m in maps])
    return [torch.cat(level) for level in zip(*chunks)]


def tuned_parameters(encoder: nn.Module, blocks: int) -> list[nn.Parameter]:
    """Parameters after depth - blocks by the encoder's layer_id (the last `blocks` blocks, final norm)."""
    if blocks <= 0:
        return []
    if not isinstance(encoder, Encoder):
        raise ValueError(f"{type(encoder).__name__} has no layer_id; it cannot tune its last blocks")
    first = encoder.num_layers + 1 - blocks
    return [p for n, p in encoder.named_parameters() if p.requires_grad and encoder.layer_id(n) >= first]


def train_segmentation(
    encoder: nn.Module,
    train: DenseData,
    test: DenseData,
    num_classes: int,
    config: SegmentationConfig,
    class_names: list[str] | None = None,
    device: str | torch.device = "cpu",
    log=print,
) -> dict[str, Any]:
    """Train a head (and the last `config.tune_blocks` blocks) on `train`, evaluate on `test`.

    With several `config.lrs` (frozen encoder only), one head per lr trains on the training images minus a
    seeded `val_fraction`, the one with the best mIoU on that held-out share is kept (the test set chooses
    nothing). Returns {"miou", "pixel_accuracy", "iou", "pixels", "lr", "val_miou", "steps", "seconds",
    "train_loss_first", "train_loss_last", ...} and the trained modules in "modules" (head, encoder)."""
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    trainable = [(p, p.requires_grad) for p in encoder.parameters()]  # restored at the end
    tuned = tuned_parameters(encoder, config.tune_blocks)
    tuned_ids = {id(p) for p in tuned}
    for p in encoder.parameters():
        p.requires_grad_(id(p) in tuned_ids)
    lrs = tuple(config.lrs or (config.lr or HEAD_LRS[config.head],))
    if len(lrs) > 1 and tuned:
        raise ValueError("an lr sweep needs a frozen encoder (tune_blocks=0): give one lr with --tune-blocks")
    fit, val = torch.arange(len(train)), None
    if len(lrs) > 1:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
        n_val = max(1, int(round(config.val_fraction * len(train))))
        fit, val = order[n_val:].sort().values, order[:n_val].sort().values
    cached = _maps_in_batches(encoder, train.images, 64, device) if not tuned else None
    start = time.perf_counter()
    runs = []
    for lr in lrs:
        head, losses = _fit_head(encoder, train, fit, cached, tuned, num_classes, config, lr, device, log)
        val_miou = None
        if val is not None:
            conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
            assert cached is not None  # an lr sweep has a frozen encoder, its maps cached
            for s in range(0, len(val), 64):
                idx = val[s : s + 64]
                with torch.no_grad():
                    logits = _full_size(
                        head([level[idx].to(device) for level in cached]), train.masks.shape[-2:]
                    )
                conf += confusion(logits.argmax(1).cpu(), train.masks[idx], num_classes)
            val_miou = segmentation_metrics(conf)["miou"]
            log(f"[segment] {config.head} lr {lr:g}: held-out mIoU {100 * val_miou:.1f}")
        runs.append((val_miou if val_miou is not None else 0.0, lr, head, losses))
    val_miou, lr, head, losses = max(runs, key=lambda r: r[0])
    seconds = time.perf_counter() - start
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for s in range(0, len(test), 64):
        pred = predict(encoder, head, test.images[s : s + 64].to(device))
        conf += confusion(pred.cpu(), test.masks[s : s + 64], num_classes)
    for p, flag in trainable:
        p.requires_grad_(flag)
    result = segmentation_metrics(conf, class_names)
    result.update(
        head=config.head, lr=lr, steps=len(losses), seconds=round(seconds, 1), train_loss_first=losses[0],
        train_loss_last=sum(losses[-10:]) / len(losses[-10:]), num_train=len(fit), num_test=len(test),
        config=dataclasses.asdict(config), modules={"encoder": encoder, "head": head},
    )  # fmt: skip
    if val is not None:
        result.update(val_miou={f"{r[1]:g}": round(r[0], 4) for r in runs}, num_val=len(val))
    return result


def _fit_head(
    encoder: nn.Module,
    train: DenseData,
    fit: torch.Tensor,
    cached: list[torch.Tensor] | None,
    tuned: list[nn.Parameter],
    num_classes: int,
    config: SegmentationConfig,
    lr: float,
    device: torch.device,
    log,
) -> tuple[nn.Module, list[float]]:
    """One head (and the tuned blocks) trained on train[fit]: AdamW, cosine from `lr` to 0."""
    torch.manual_seed(config.seed)
    head = build_head(config.head, encoder, num_classes, config.channels, config.min_stride).to(device)
    groups: list[dict[str, Any]] = [{"params": list(head.parameters()), "lr": lr}]
    if tuned:
        groups.append({"params": tuned, "lr": config.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    steps_per_epoch = max(1, len(fit) // config.batch_size)
    total = steps_per_epoch * config.epochs
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    head.train()
    for epoch in range(config.epochs):
        order = fit[torch.randperm(len(fit), generator=gen)]
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * 0.5 * (1 + math.cos(math.pi * len(losses) / total))
            masks = train.masks[idx].to(device)
            if cached is not None:
                maps = [level[idx].to(device) for level in cached]
            else:
                maps = encoder_maps(encoder, train.images[idx].to(device))
            logits = _full_size(head(maps), masks.shape[-2:])
            loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        recent = losses[-steps_per_epoch:]
        log(
            f"[segment] {config.head} lr {lr:g} epoch {epoch + 1}/{config.epochs}: loss {sum(recent) / len(recent):.4f}"
        )
    head.eval()
    return head, losses


def _full_size(logits: torch.Tensor, size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def predict(encoder: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H, W] class ids."""
    with torch.no_grad():
        return _full_size(head(encoder_maps(encoder, images)), images.shape[-2:]).argmax(1)


# ------------------------------------------------------------------------------------------- data, pictures


@dataclasses.dataclass
class DenseSpec:
    """Where the dense task comes from: "canvas" (Fashion-MNIST garments on a canvas) or "folder"."""

    source: str = "canvas"
    path: str | None = None  # folder: image + mask pairs; canvas: the Fashion-MNIST IDX folder (optional)
    num_train: int = 2000
    num_test: int = 500
    canvas_size: int = 64
    max_garments: int = 4
    test_fraction: float = 0.2  # folders without train/ and test/
    seed: int = 0


def dense_datasets(spec: DenseSpec) -> tuple[Any, Any, list[str]]:
    """(train, test, class names) as datasets of (PIL image, mask)."""
    from ..data.segmentation import GarmentCanvas, SegmentationFolder

    if spec.source == "canvas":
        make = lambda split, n: GarmentCanvas(  # noqa: E731
            split, n, spec.canvas_size, spec.max_garments, seed=spec.seed, root=spec.path
        )
        canvas_train, canvas_test = make("train", spec.num_train), make("test", spec.num_test)
        return canvas_train, canvas_test, canvas_train.classes
    if spec.source != "folder":
        raise ValueError(f"dense data source must be 'canvas' or 'folder', got {spec.source!r}")
    if not spec.path:
        raise ValueError(
            "--data folder needs --data-path DIR (image + mask pairs, see `mimkit probe segment -h`)"
        )
    root = Path(spec.path).expanduser()
    train: Any
    test: Any
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = SegmentationFolder(root, "train"), SegmentationFolder(root, "test")
        classes = train.classes if len(train.classes) >= len(test.classes) else test.classes
    else:
        full = SegmentationFolder(root)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(spec.seed)).tolist()
        n_test = max(1, int(round(spec.test_fraction * len(full))))
        if n_test >= len(full):
            raise ValueError(f"{root} holds {len(full)} pair(s): too few to hold out a test share")
        train, test = _Subset(full, sorted(order[n_test:])), _Subset(full, sorted(order[:n_test]))
        classes = full.classes
    return (
        _Subset(train, range(min(spec.num_train, len(train)))),
        _Subset(test, range(min(spec.num_test, len(test)))),
        classes,
    )


class _Subset(torch.utils.data.Dataset):
    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


def palette(num_classes: int) -> np.ndarray:
    """[K, 3] colours in [0, 1]: black for class 0 (background), matplotlib's tab20 after it."""
    import matplotlib

    colours = [(0.0, 0.0, 0.0)] + [matplotlib.colormaps["tab20"](i % 20)[:3] for i in range(num_classes - 1)]
    return np.array(colours)


def save_prediction_grid(
    path: str | os.PathLike,
    images: torch.Tensor,
    masks: torch.Tensor,
    predictions: dict[str, torch.Tensor],
    class_names: list[str],
    mean: Any,
    std: Any,
    title: str = "",
) -> Path:
    """One row per image: image | ground truth | each prediction (titled by its key), classes coloured
    (legend below). images [N, C, H, W] normalised, masks and predictions [N, H, W]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = palette(len(class_names))
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)

    def coloured(m: torch.Tensor) -> np.ndarray:
        m = m.clone()
        m[m == IGNORE_INDEX] = 0
        return colours[m.numpy()]

    columns = [("image", None), ("ground truth", masks)] + list(predictions.items())
    n = len(images)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.6 * len(columns), 1.6 * n + 0.9), squeeze=False)
    for i in range(n):
        shown = (images[i].cpu() * std_t + mean_t).clamp(0, 1)
        shown = shown.expand(3, -1, -1) if shown.shape[0] == 1 else shown[:3]
        for j, (name, maps) in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(shown.permute(1, 2, 0).numpy() if maps is None else coloured(maps[i].cpu()),
                      interpolation="nearest")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    handles = [Patch(color=colours[k], label=name) for k, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=6, frameon=False)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ the whole check


@dataclasses.dataclass
class DenseEncoder:
    """An encoder ready for the dense check, with what it needs to see images as it was trained to."""

    encoder: nn.Module
    name: str
    init: str  # "pretrained", "random" or "pixels"
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    key: dict[str, Any]


def dense_encoder(
    checkpoint: str | os.PathLike | None = None,
    random_init: str | None = None,
    pixels: bool = False,
    img_size: int | tuple[int, int] = 64,
    pixel_patch: int = 4,
    seed: int = 0,
) -> DenseEncoder:
    """The encoder of a checkpoint (or its architecture at random init, `random_init=""`, or a preset at
    random init, `random_init=NAME`) at `img_size`; with `pixels`, the raw-pixel baseline at that model's
    stride (or `pixel_patch` without a model). Normalisation: the checkpoint's, else Fashion-MNIST's."""
    from ..data import default_mean_std
    from ..dense import PixelEncoder, encoder_at_size
    from .pipeline import load_eval_model, model_display_name

    model: Any = None
    key: dict[str, Any] = {}
    if checkpoint is not None or random_init:
        model, key = load_eval_model(checkpoint, random_init, seed=seed)
    in_chans = model.config.in_chans if model is not None else 1
    prep = (getattr(model, "mimkit_info", None) or {}).get("preprocessing") if model is not None else None
    mean, std = (
        (tuple(prep["mean"]), tuple(prep["std"])) if prep else default_mean_std("fashion_mnist", in_chans)
    )
    if pixels:
        stride = map_specs(model.encoder)[-1][1] if model is not None else pixel_patch
        return DenseEncoder(PixelEncoder(stride, in_chans), f"raw pixels (patch {stride})", "pixels", in_chans,
                            mean, std, {"model": "pixels", "patch": stride})  # fmt: skip
    init = "random" if random_init is not None else "pretrained"
    encoder = encoder_at_size(model, img_size)
    return DenseEncoder(encoder, model_display_name(model, key), init, in_chans, mean, std, key)


def segmentation_check(
    dense: DenseEncoder,
    spec: DenseSpec,
    heads: tuple[str, ...] = HEADS,
    config: SegmentationConfig | None = None,
    img_size: int | tuple[int, int] = 64,
    device: str = "cpu",
    log=print,
    data: tuple[DenseData, DenseData, list[str]] | None = None,
    head_lrs: dict[str, tuple[float, ...]] | None = None,
) -> dict[str, Any]:
    """Train and evaluate each head on the dense task; {"encoder", "init", "heads": {head: metrics}, ...}.
    `data` re-uses already transformed (train, test, classes) (same normalisation and size); `head_lrs`
    gives a head its own lrs to choose from (else `config.lrs` / `config.lr`)."""
    from ..data.segmentation import DenseTransform

    config = config or SegmentationConfig()
    head_lrs = head_lrs or {}
    if data is None:
        train_ds, test_ds, classes = dense_datasets(spec)
        transform = DenseTransform(img_size, dense.in_chans, dense.mean, dense.std)
        data = (DenseData(train_ds, transform), DenseData(test_ds, transform), classes)
    train, test, classes = data
    out: dict[str, Any] = {"encoder": dense.name, "init": dense.init, "model_key": dense.key, "heads": {},
                           "class_names": classes, "data": dataclasses.asdict(spec), "img_size": img_size}  # fmt: skip
    modules = {}
    for head in heads:
        log(f"[segment] {dense.name} ({dense.init}), {head} head")
        head_config = dataclasses.replace(config, head=head, lrs=head_lrs.get(head, config.lrs))
        result = train_segmentation(dense.encoder, train, test, len(classes), head_config,
                                    class_names=classes, device=device, log=log)  # fmt: skip
        modules[head] = result.pop("modules")
        out["heads"][head] = result
    out["modules"] = modules
    return out


def summary_lines(results: list[dict[str, Any]]) -> list[str]:
    """A markdown table: encoder | init | mIoU and pixel accuracy per head."""
    heads = sorted(
        {h for r in results for h in r["heads"]}, key=lambda h: HEADS.index(h) if h in HEADS else 9
    )
    header = "| encoder | init | " + " | ".join(f"{h} mIoU | {h} pixel acc." for h in heads) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(heads))]
    for r in results:
        cells = []
        for h in heads:
            m = r["heads"].get(h)
            cells += [f"{100 * m['miou']:.1f}", f"{100 * m['pixel_accuracy']:.1f}"] if m else ["—", "—"]
        lines.append(f"| {r['encoder']} | {r['init']} | " + " | ".join(cells) + " |")
    return lines
