"""Semantic segmentation check: a frozen encoder (or its last k blocks tuned) + a light head, mIoU and pixel
accuracy on a dense task.

Heads (both read the encoder through `mimkit.dense`, i.e. timm's feature contract):

- "linear": per-patch linear head. BatchNorm (no affine) + one 1x1 conv from the encoder's last map
  (stride r) to K * r * r logits, pixel-shuffled to full resolution: each token predicts the classes of its
  own r x r pixels, nothing else mixes tokens (the dense analogue of the linear probe).
- "fpn": a small UperNet-style head over the 4-level pyramid (ViTDet's simple pyramid for plain ViTs,
  ConvMAE's native one): top-down FPN merging (nearest 2x upsampling + sum, a 3x3 conv per level), every
  level upsampled to the finest and concatenated, a 1x1 conv + LayerNorm + GELU, a 1x1 classifier,
  bilinear upsampling to the image.

With a frozen encoder (`tune_blocks=0`) its maps are computed once (stored in float16) and the head trains
on them; with `tune_blocks=k` the parameters of the last k blocks and the final norm (the encoder's
`layer_id` > depth - k) train too, at `encoder_lr`, and the encoder runs at every step.
Metrics: confusion matrix over every labelled test pixel (255 = ignore); IoU_c = TP / (TP + FP + FN),
mIoU = the mean over classes present in the ground truth or the predictions; pixel accuracy = TP / pixels.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.segmentation import IGNORE_INDEX
from ..dense import build_neck, conv_ln, encoder_maps, map_specs

HEADS = ("linear", "fpn")


class LinearSegHead(nn.Module):
    """[B, C, h, w] map at stride r -> [B, K, h*r, w*r] logits; each token predicts its own r x r pixels."""

    def __init__(self, in_channels: int, stride: int, num_classes: int):
        super().__init__()
        self.stride = stride
        self.bn = nn.BatchNorm2d(in_channels, affine=False)
        self.proj = nn.Conv2d(in_channels, num_classes * stride * stride, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return F.pixel_shuffle(self.proj(self.bn(maps[-1].float())), self.stride)


class FPNSegHead(nn.Module):
    """Pyramid neck + top-down FPN + fuse + classifier; see the module doc. Logits at the finest level."""

    def __init__(self, encoder: nn.Module, num_classes: int, channels: int = 64):
        super().__init__()
        self.neck = build_neck(encoder, channels)
        n = len(self.neck.strides)
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


def build_head(kind: str, encoder: nn.Module, num_classes: int, channels: int = 64) -> nn.Module:
    if kind == "linear":
        in_channels, stride = map_specs(encoder)[-1]
        return LinearSegHead(in_channels, stride, num_classes)
    if kind == "fpn":
        return FPNSegHead(encoder, num_classes, channels)
    raise ValueError(f"segmentation head must be one of {HEADS}, got {kind!r}")


@dataclasses.dataclass
class SegmentationConfig:
    head: str = "fpn"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # AdamW, cosine to 0 over the run
    weight_decay: float = 1e-4
    channels: int = 64  # FPN / pyramid width
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
    if not hasattr(encoder, "layer_id"):
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

    Returns {"miou", "pixel_accuracy", "iou", "pixels", "steps", "seconds", "train_loss_last", "head", ...}
    and keeps the trained modules in the returned "modules" entry (head, encoder) for predictions."""
    device = torch.device(device)
    torch.manual_seed(config.seed)
    encoder = encoder.to(device).eval()
    head = build_head(config.head, encoder, num_classes, config.channels).to(device)
    for p in encoder.parameters():
        p.requires_grad_(False)
    tuned: list[nn.Parameter] = []
    if config.tune_blocks > 0:
        for p in encoder.parameters():  # requires_grad back on for the tuned part only
            p.requires_grad_(True)
        tuned = tuned_parameters(encoder, config.tune_blocks)
        tuned_ids = {id(p) for p in tuned}
        for p in encoder.parameters():
            p.requires_grad_(id(p) in tuned_ids)
    groups = [{"params": list(head.parameters()), "lr": config.lr}]
    if tuned:
        groups.append({"params": tuned, "lr": config.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in groups]

    cached = _maps_in_batches(encoder, train.images, 64, device) if not tuned else None
    steps_per_epoch = max(1, len(train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    gen = torch.Generator().manual_seed(config.seed)
    start, step, losses = time.perf_counter(), 0, []
    head.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(train), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
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
            step += 1
        log(
            f"[segment] {config.head} epoch {epoch + 1}/{config.epochs}: loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.4f}"
        )
    seconds = time.perf_counter() - start
    head.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for s in range(0, len(test), 64):
        pred = predict(encoder, head, test.images[s : s + 64].to(device))
        conf += confusion(pred.cpu(), test.masks[s : s + 64], num_classes)
    for p in encoder.parameters():
        p.requires_grad_(False)
    result = segmentation_metrics(conf, class_names)
    result.update(
        head=config.head, steps=step, seconds=round(seconds, 1), train_loss_first=losses[0],
        train_loss_last=sum(losses[-10:]) / len(losses[-10:]), num_train=len(train), num_test=len(test),
        config=dataclasses.asdict(config), modules={"encoder": encoder, "head": head},
    )  # fmt: skip
    return result


def _full_size(logits: torch.Tensor, size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def predict(encoder: nn.Module, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H, W] class ids."""
    with torch.no_grad():
        return _full_size(head(encoder_maps(encoder, images)), images.shape[-2:]).argmax(1)
