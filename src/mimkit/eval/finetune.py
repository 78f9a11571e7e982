"""Full and partial fine-tuning (SPEC §6).

Classifier: encoder -> mean of the patch tokens -> fresh LayerNorm -> Linear. AdamW with layer-wise lr
decay: a parameter at depth `layer_id` (encoder.layer_id: 0 = embeddings, i + 1 = blocks.i, depth + 1 =
final norm and the head) gets lr * decay^(depth + 1 - layer_id). Drop-path comes from the encoder (build it
with drop_path_rate), Mixup/CutMix and soft-target cross-entropy from timm, RandAugment from torchvision,
label smoothing through timm's Mixup (or plain cross-entropy's label_smoothing when mixing is off).

Linear probe first (LP-FT, Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features"):
with `linear_probe_epochs > 0`, only fc_norm + head train first (encoder frozen, in eval mode) at
`linear_probe_lr`, then everything fine-tunes from that head. A random head's large early gradients no
longer reach the pretrained blocks; with few labels this is worth points (docs/evidence.md).

Partial fine-tuning: `blocks=k` trains only the last k encoder blocks and the head (fc_norm + Linear);
k = 0 is a linear probe on mean-pooled tokens (with a LayerNorm), k >= depth (or None) is full fine-tuning,
in which the embeddings and the encoder's final norm train too. Frozen modules stay in eval mode, so
their drop-path and any BatchNorm statistics never change.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.distributed import autocast
from ..engine.optim import cosine_lr, no_decay
from ..errors import ConfigError
from .features import get_encoder, pool_tokens


class FinetuneClassifier(nn.Module):
    """images [B, C, H, W] -> logits [B, num_classes]: mean-pooled patch tokens, fresh LayerNorm, Linear."""

    def __init__(self, encoder: nn.Module, num_classes: int, head_init_std: float = 0.01):
        super().__init__()
        self.encoder = get_encoder(encoder)
        # Parameters built frozen (the fixed sin-cos pos_embed) are never made trainable.
        self.fixed_parameters = {
            f"encoder.{n}" for n, p in self.encoder.named_parameters() if not p.requires_grad
        }
        dim = self.encoder.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)  # [B, P + L, D]
        return pool_tokens(tokens, self.encoder.num_prefix_tokens, "mean")  # [B, D]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.forward_features(images)))  # [B, num_classes]


def layer_decay_param_groups(
    model: FinetuneClassifier, weight_decay: float = 0.05, layer_decay: float = 0.75
) -> list[dict]:
    """Parameter groups of the trainable parameters, each with `lr_scale`, `weight_decay` and `layer_id`.

    lr_scale = layer_decay ** (num_layers + 1 - layer_id); the head (fc_norm, head) is at num_layers + 1.
    No weight decay on 1-D parameters (biases, norms) and on the encoder's `no_weight_decay()` names.
    """
    encoder = model.encoder
    depth = encoder.num_layers
    skip = set(encoder.no_weight_decay())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # the pretraining rule (engine.optim.no_decay), plus the encoder's no_weight_decay() names, as the
        # authors' fine-tuning recipes spare the class token and position table
        sub = name.removeprefix("encoder.")
        spared = name.startswith("encoder.") and (sub in skip or sub.split(".")[0] in skip)
        decay = not no_decay(name, p) and not spared
        layer_id = encoder.layer_id(sub) if name.startswith("encoder.") else depth + 1
        key = (layer_id, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "layer_id": layer_id,
                "lr_scale": layer_decay ** (depth + 1 - layer_id),
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def set_trainable_blocks(model: FinetuneClassifier, blocks: int | None) -> list[str]:
    """Freeze everything but the last `blocks` encoder blocks and the head; None or >= depth: train all.

    Returns the names of the trainable parameters.
    """
    encoder = model.encoder
    depth = encoder.num_layers
    if blocks is not None and blocks < 0:
        raise ValueError(f"blocks must be >= 0 (0 = linear probe, {depth} = full fine-tuning), got {blocks}")
    full = blocks is None or blocks >= depth
    for p in model.parameters():
        p.requires_grad_(full)
    if blocks is not None and not full:
        for block in list(encoder.blocks)[depth - blocks :]:
            for p in block.parameters():
                p.requires_grad_(True)
        for p in (*model.fc_norm.parameters(), *model.head.parameters()):
            p.requires_grad_(True)
    for name, p in model.named_parameters():
        if name in model.fixed_parameters:
            p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def train_mode(model: nn.Module) -> None:
    """model.train(), then every module without a trainable parameter back to eval (frozen parts)."""
    model.train()
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


@dataclass
class FinetuneConfig:
    epochs: int = 10
    batch_size: int = 64
    base_lr: float = 1e-3  # lr = base_lr * batch / 256
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: float = 1.0  # fractions allowed: 0.1 * epochs warms up over a tenth of the steps
    drop_path_rate: float = 0.1  # applied when the model is built (see load_model)
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    randaug: bool = True
    randaug_num_ops: int = 2
    randaug_magnitude: int = 9
    crop_scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop's area range
    linear_probe_epochs: int = 0  # LP-FT: train only the head this many epochs first (0 = off)
    linear_probe_lr: float = 0.1  # its base lr (lr = base * batch / 256), no weight decay
    blocks: int | None = None  # partial fine-tuning: last k blocks; None = full
    clip_grad: float | None = None
    max_minutes: float | None = None  # stop early (schedule unchanged) after this much training time
    num_workers: int = 0
    seed: int = 0
    precision: str = "fp32"  # "bf16": the forward under autocast; the loss, backward and AdamW in fp32

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(
                f"crop scale ({low}, {high}) must satisfy 0 < min <= max <= 1 (e.g. --crop-min 0.25)"
            )
        if self.linear_probe_epochs < 0:
            raise ConfigError(
                f"linear probe epochs must be >= 0 (0 = no LP-FT), got {self.linear_probe_epochs}"
            )


def finetune_transform(
    img_size, in_chans: int, mean: Sequence[float], std: Sequence[float], cfg: FinetuneConfig
):
    """RandomResizedCrop(cfg.crop_scale) + flip + torchvision RandAugment on PIL images -> normalised
    [C, H, W]."""
    from torchvision.transforms import InterpolationMode, v2

    from ..data.transforms import ConvertMode
    from ..layers import to_2tuple

    ops = [
        ConvertMode(in_chans),
        v2.RandomResizedCrop(
            to_2tuple(img_size),
            scale=tuple(cfg.crop_scale),
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        ),
        v2.RandomHorizontalFlip(),
    ]
    if cfg.randaug:
        ops.append(v2.RandAugment(num_ops=cfg.randaug_num_ops, magnitude=cfg.randaug_magnitude))
    ops += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.ToPureTensor(),
    ]
    return v2.Compose(ops)


@torch.no_grad()
def predict(
    model: nn.Module, loader, device: torch.device, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions [N], labels [N]) with the model in eval mode."""
    model.eval()
    preds, labels = [], []
    for batch in loader:
        images, y = batch[0], batch[-1]
        with autocast(precision, device):
            preds.append(model(images.to(device)).argmax(-1).cpu())
        labels.append(torch.as_tensor(y).long())
    return torch.cat(preds), torch.cat(labels)


def finetune(
    model: FinetuneClassifier,
    train_data: Any,  # a Dataset with len()
    test_data: torch.utils.data.Dataset,
    num_classes: int,
    config: FinetuneConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log=print,
) -> dict:
    """Fine-tune `model` on `train_data` (items (image [C, H, W], label), augmented already) and evaluate
    on `test_data`. Returns {"predictions", "labels", "history", "trainable", "config", "seconds"}."""
    cfg = config or FinetuneConfig()
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    batch = cfg.batch_size - cfg.batch_size % 2  # Mixup pairs samples: even batches
    if batch < 2 or len(train_data) < batch:
        raise ValueError(
            f"batch_size {cfg.batch_size} needs at least that many training images (have {len(train_data)})"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        train_data, batch_size=batch, shuffle=True, drop_last=True, num_workers=cfg.num_workers, generator=gen
    )
    test_loader = torch.utils.data.DataLoader(test_data, batch_size=256, num_workers=cfg.num_workers)
    start, stopped_early = time.perf_counter(), False
    history: list[dict] = []
    deadline = None if cfg.max_minutes is None else start + 60 * cfg.max_minutes
    if cfg.linear_probe_epochs > 0:  # LP-FT: the head alone first, no mixing, no weight decay
        set_trainable_blocks(model, 0)
        head_cfg = replace(
            cfg, epochs=cfg.linear_probe_epochs, base_lr=cfg.linear_probe_lr, weight_decay=0.0,
            layer_decay=1.0, warmup_epochs=0.1 * cfg.linear_probe_epochs, mixup=0.0, cutmix=0.0,
        )  # fmt: skip
        stopped_early = _train(
            model, loader, head_cfg, num_classes, device, progress, log, "linear probe", history, deadline
        )
    trainable = set_trainable_blocks(model, cfg.blocks)
    if not stopped_early:
        stopped_early = _train(
            model, loader, cfg, num_classes, device, progress, log, "finetune", history, deadline
        )
    preds, labels = predict(model, test_loader, device, cfg.precision)
    return {
        "predictions": preds,
        "labels": labels,
        "history": history,
        "trainable": trainable,
        "config": {**asdict(cfg), "lr": cfg.base_lr * batch / 256, "effective_batch_size": batch,
                   "stopped_early": stopped_early},
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def _train(
    model: FinetuneClassifier, loader, cfg: FinetuneConfig, num_classes: int, device: torch.device,
    progress: bool, log, phase: str, history: list[dict], deadline: float | None,
) -> bool:  # fmt: skip
    """One phase: AdamW with layer-wise lr decay and a cosine schedule over cfg.epochs on the trainable
    parameters. Appends one record per epoch to `history`; returns True if it stopped at `deadline`
    (time.perf_counter(); the schedule is not shortened)."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    groups = layer_decay_param_groups(model, cfg.weight_decay, cfg.layer_decay)
    lr = cfg.base_lr * loader.batch_size / 256
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    mixup = (
        Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
        if cfg.mixup > 0 or cfg.cutmix > 0
        else None
    )
    soft_ce = SoftTargetCrossEntropy()
    total = cfg.epochs * len(loader)
    warmup = round(cfg.warmup_epochs * len(loader))
    step = 0
    for epoch in range(cfg.epochs):
        train_mode(model)
        losses = []
        batches: Iterable[Any] = loader
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc=f"{phase} epoch {epoch}", leave=False, dynamic_ncols=True)
        for images, *_, labels in batches:
            cur = cosine_lr(step, total, lr, warmup, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = cur * g["lr_scale"]
            images, labels = images.to(device), torch.as_tensor(labels).to(device)
            if mixup is not None:
                images, targets = mixup(images, labels)  # targets [B, C] soft
            with autocast(cfg.precision, device):  # forward only: autocast around the backward and the
                logits = model(images).float()  # optimizer step left the loss at ln(classes) on CPU
            if mixup is not None:
                loss = soft_ce(logits, targets)
            else:
                loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite {phase} loss {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.clip_grad)
            opt.step()
            losses.append(loss.item())
            step += 1
            if deadline is not None and time.perf_counter() > deadline:
                break
        mean_loss = sum(losses) / max(1, len(losses))
        history.append({"phase": phase, "epoch": epoch, "loss": mean_loss, "steps": step})
        log(f"{phase} epoch {epoch}: loss {mean_loss:.4f}")
        if deadline is not None and time.perf_counter() > deadline:
            log(f"{phase}: time budget of {cfg.max_minutes} min reached after {step} steps")
            return True
    return False
