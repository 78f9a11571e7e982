"""The method-agnostic pretraining loop: any model returning `MIMOutput` trains here unchanged.

Launch the same code on one process or many:
    mimkit pretrain --config configs/mae_tiny_fmnist.yaml
    torchrun --nproc_per_node 8 -m mimkit pretrain --config configs/mae_vit_base_pretrain.yaml
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m mimkit pretrain --config ...

Everything random in a step is a pure function of (seed, step, rank) or (seed, epoch, sample index), so a
resumed run reproduces an uninterrupted one, and N processes reproduce one process with N accumulated
micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import create_model
from .checkpoint import atomic_save, load_checkpoint, model_state
from .config import Config, save_config
from .distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from .optim import cosine_lr, param_groups


class NonFiniteLossError(RuntimeError):
    pass


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919) % (2**63 - 1)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.out_dir = Path(cfg.train.output_dir)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank

        self.model = create_model(cfg.model_name, **cfg.model_overrides).to(self.dist.device)
        self.train_loader, self.dataset, self.sampler = self._build_data()
        self.micro_per_epoch = len(self.train_loader)
        if self.micro_per_epoch < cfg.optim.accum_steps:
            raise ValueError(
                f"the dataset gives {self.micro_per_epoch} batches per process per epoch, fewer than "
                f"optim.accum_steps={cfg.optim.accum_steps}; use a smaller data.batch_size or more data"
            )
        self.steps_per_epoch = self.micro_per_epoch / cfg.optim.accum_steps
        self.total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * self.steps_per_epoch))
        self.warmup_steps = (
            cfg.optim.warmup_steps
            if cfg.optim.warmup_steps is not None
            else int(cfg.optim.warmup_epochs * self.steps_per_epoch)
        )
        self.global_batch = cfg.data.batch_size * cfg.optim.accum_steps * self.dist.world_size
        self.peak_lr = (
            cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * self.global_batch / 256
        )

        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.fsdp = self.dist.enabled and cfg.train.distributed == "fsdp"
        if self.fsdp:  # shards parameters in place: must precede the optimizer
            from .fsdp import shard_model

            shard_model(self.model, activation_checkpointing=cfg.train.activation_checkpointing)
        self.online_probe = self._build_online_probe() if cfg.train.online_probe else None
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.optim.weight_decay)
            + (param_groups(self.online_probe, 0.0) if self.online_probe else []),
            lr=self.peak_lr,
            betas=tuple(cfg.optim.betas),
            fused=not self.fsdp,  # one kernel for all parameters (about 5x faster on CPU); fp32 state
        )
        self.step = 0
        self.micro_done = 0  # micro-batches consumed since the start of training
        if cfg.train.resume:
            self._resume(cfg.train.resume)
        self.train_model = self._wrap(self.model)
        self.flops_per_image, self.ceiling = self._measure_flops()

    def _measure_flops(self) -> tuple[float, float]:
        """Model FLOPs per image per training step and the matmul ceiling they are compared with (MFU)."""
        from .perf import measure_matmul_ceiling, model_flops_per_image

        flops = float(model_flops_per_image(self.model))
        ceiling = self.cfg.train.matmul_ceiling
        if ceiling is None:
            dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32
            ceiling = measure_matmul_ceiling(dtype, device=self.dist.device)
        return flops, float(ceiling)

    # ---------------------------------------------------------------- setup
    def _build_data(self):
        """(loader, dataset, position keeper): the dataset has set_epoch, the keeper set_epoch/set_start."""
        from ..data import MIMDataset, ResumableSampler, build_dataset, build_loader, default_mean_std
        from ..data.transforms import pretrain_transform

        c, mc, seed = self.cfg.data, self.model.config, self.cfg.train.seed
        mean, std = default_mean_std(c.source, mc.in_chans)
        transform = pretrain_transform(
            mc.img_size, mc.in_chans, c.mean or mean, c.std or std, scale=(c.min_crop_scale, 1.0)
        )
        if c.source == "shards":  # a stream: the dataset splits by rank/worker and keeps its own position
            from ..data.shards import ShardDataset

            dataset = ShardDataset(
                c.path, c.batch_size, self.dist.rank, self.dist.world_size, seed=seed, in_chans=mc.in_chans,
                transform=transform, mask_generator=self.model.mask_generator,
            )  # fmt: skip
            return build_loader(dataset, c.batch_size, c.num_workers), dataset, dataset
        base = build_dataset(
            c.source, path=c.path, split=c.split, num_samples=c.num_samples,
            img_size=mc.img_size, in_chans=mc.in_chans, seed=seed,
        )  # fmt: skip
        dataset = MIMDataset(base, transform, self.model.mask_generator, seed=seed)
        sampler = ResumableSampler(
            len(dataset), self.dist.world_size, self.dist.rank, seed=seed, shuffle=True
        )
        return build_loader(dataset, c.batch_size, c.num_workers, sampler), dataset, sampler

    def _build_online_probe(self) -> nn.Module:
        from ..eval.online import OnlineProbe

        num_classes = getattr(self.dataset, "num_classes", None)
        if not num_classes:
            raise ValueError(
                "train.online_probe needs a labelled dataset (class subfolders or a known dataset)"
            )
        return OnlineProbe(self.model.encoder.embed_dim, num_classes).to(self.dist.device)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.enabled and not self.fsdp:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None
            )
        if self.cfg.train.compile:
            model = torch.compile(model)
        return model

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The full training state; under FSDP a collective that gathers everything on rank 0."""
        if self.fsdp:
            from .fsdp import full_model_state_dict, full_optimizer_state_dict

            weights = full_model_state_dict(self.model)
            optimizer = full_optimizer_state_dict(self.model, self.optimizer)
        else:
            weights, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        return {
            **model_state(self.model, weights),
            "optimizer": optimizer,
            "online_probe": self.online_probe.state_dict() if self.online_probe else None,
            "step": self.step,
            "micro_done": self.micro_done,
            "epoch": self.micro_done // self.micro_per_epoch,
            "batch_in_epoch": self.micro_done % self.micro_per_epoch,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
            "config": self.cfg.to_dict(),
        }

    def _resume(self, where: str) -> None:
        path = self.out_dir / "checkpoint.pt" if where == "auto" else Path(where)
        if where == "auto" and not path.exists():
            return
        ckpt = load_checkpoint(path)
        if ckpt.get("model_name") != self.cfg.model_name:
            raise ValueError(
                f"cannot resume: {path} holds {ckpt.get('model_name')!r}, the config asks for {self.cfg.model_name!r}"
            )
        if self.fsdp:
            from .fsdp import load_full_model_state_dict, load_full_optimizer_state_dict

            load_full_model_state_dict(self.model, ckpt["model"])
            load_full_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"])
        else:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.online_probe is not None and ckpt.get("online_probe"):
            self.online_probe.load_state_dict(ckpt["online_probe"])
        self.step, self.micro_done = int(ckpt["step"]), int(ckpt["micro_done"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        self._log(f"resumed from {path} at step {self.step}")

    def save(self, name: str = "checkpoint.pt", export: bool = False) -> Path:
        """Write the training state (rank 0) and, with `export`, the encoder as safetensors beside it."""
        path = self.out_dir / name
        state = self.state_dict()  # every rank takes part (FSDP gathers), rank 0 writes
        if self.dist.is_main:
            atomic_save(state, path)
            if export:
                export_encoder(state, self.out_dir / "encoder.safetensors")
        barrier(self.dist)
        return path

    # ---------------------------------------------------------------- loop
    def batches(self):
        """Micro-batches forever, starting at `micro_done`; epochs advance the sampler and the augmentations.

        For loops of your own (a time budget, a custom schedule): `b = trainer.batches()`, then
        `trainer.train_step(b)` as often as you like, `trainer.save()` at the end."""
        epoch, skip = divmod(self.micro_done, self.micro_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            if skip:
                self.sampler.set_start(skip * self.cfg.data.batch_size)
                skip = 0
            yield from self.train_loader
            epoch += 1

    def _autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over `accum_steps` micro-batches; returns the step's metrics."""
        cfg, dev = self.cfg, self.dist.device
        torch.manual_seed(step_seed(cfg.train.seed, self.step, self.dist.rank))  # drop-path etc.
        lr = cosine_lr(self.step, self.total_steps, self.peak_lr, self.warmup_steps, cfg.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = cfg.optim.accum_steps
        totals: dict[str, torch.Tensor] = {}
        for i in range(accum):
            images, mask, labels = next(batches)
            images, mask = images.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
            last = i == accum - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            ddp = isinstance(self.train_model, nn.parallel.DistributedDataParallel)
            with (
                self.train_model.no_sync() if ddp and not last else contextlib.nullcontext(),
                self._autocast(),
            ):
                out = self.train_model(images, mask)
                loss = out.loss
                metrics = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.metrics.items()}}
                if self.online_probe is not None:
                    probe_loss, probe_acc = self.online_probe(out.features.detach(), labels.to(dev))
                    loss = loss + probe_loss
                    metrics |= {"probe_loss": probe_loss.detach(), "probe_acc": probe_acc.detach()}
            (loss / accum).backward()
            self.micro_done += 1
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v.float() / accum
        keys = sorted(totals)
        reduced = all_reduce_mean(torch.stack([totals[k] for k in keys]), self.dist).tolist()
        stats = dict(zip(keys, reduced))
        if not math.isfinite(stats["loss"]):
            raise NonFiniteLossError(
                f"loss is {stats['loss']} at step {self.step} (lr {lr:.3g}); stopping before the weights are "
                "corrupted. Lower optim.base_lr, add optim.clip_grad, lengthen warmup, or try "
                "train.precision=fp32; resume from the last checkpoint with train.resume=auto."
            )
        if cfg.optim.clip_grad:
            stats["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "after_optimizer_step"):
            self.model.after_optimizer_step()
        self.step += 1
        stats["lr"] = lr
        return stats

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        logger = MetricLogger(self.out_dir, enabled=self.dist.is_main)
        self._log(
            f"{cfg.model_name}: {self.num_params / 1e6:.2f}M params, "
            f"{len(self.dataset)} images, global batch {self.global_batch}, peak lr {self.peak_lr:.3g}, "
            f"{self.total_steps} steps ({self.steps_per_epoch:.1f}/epoch), {self.dist.world_size} process(es) on "
            f"{self.dist.device}, {cfg.train.precision}; {self.flops_per_image / 1e9:.2f} GFLOP/image/step, "
            f"matmul ceiling {self.ceiling / 1e9:.0f} GFLOP/s"
        )
        self.train_model.train()
        batches = self.batches()
        bar = progress_bar(self.total_steps, self.step, enabled=self.dist.is_main and cfg.train.progress)
        stats: dict[str, float] = {}
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.step < self.total_steps:
                stats = self.train_step(batches)
                window_images += self.global_batch
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    stats["img_per_sec"] = window_images / elapsed
                    # per-process MFU: this process's share of the images against one device's ceiling
                    stats["mfu"] = (
                        stats["img_per_sec"] / self.dist.world_size * self.flops_per_image / self.ceiling
                    )
                    stats["epoch"] = self.micro_done / self.micro_per_epoch
                    logger.log(self.step, stats)
                    window_start, window_images = time.perf_counter(), 0
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{stats['loss']:.4f}",
                            lr=f"{stats['lr']:.2e}",
                            img_s=f"{stats['img_per_sec']:.1f}",
                            mfu=f"{stats['mfu']:.1%}",
                        )
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.train.ckpt_every == 0 or self.step == self.total_steps:
                    self.save(export=self.step == self.total_steps)
                keep = cfg.train.keep_every_epochs
                if keep and self.micro_done % (keep * self.micro_per_epoch) < cfg.optim.accum_steps:
                    self.save(f"checkpoint-epoch{self.micro_done // self.micro_per_epoch:04d}.pt")
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        if self.dist.is_main:
            bad = getattr(self.dataset, "num_bad", 0)
            if bad:
                self._log(f"skipped {bad} unreadable image(s) in this process; see the warnings above")
        barrier(self.dist)
        return stats

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[mimkit] {msg}", flush=True)

    def close(self) -> None:
        cleanup(self.dist)


def export_encoder(checkpoint: dict[str, Any], path: str | Path) -> None:
    """A checkpoint's encoder weights as safetensors (timm key names), the model config in its metadata."""
    from safetensors.torch import save_file

    prefix = "encoder."
    state = {
        k[len(prefix) :]: v.contiguous().cpu() for k, v in checkpoint["model"].items() if k.startswith(prefix)
    }
    meta = {
        "model_name": str(checkpoint["model_name"]),
        "model_config": json.dumps(checkpoint["model_config"]),
    }
    save_file(state, str(path), metadata=meta)


class MetricLogger:
    """One JSON line per log step in metrics.jsonl, mirrored to TensorBoard (rank 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.file = self.tb = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                self.tb = None

    def log(self, step: int, stats: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **stats, "time": time.time()}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in stats.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)
