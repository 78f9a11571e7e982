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
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import build_pretrain_data, micro_batches
from ..data.checks import pretrain_warnings
from ..data.pretrain import skipped_images_note
from ..errors import NonFiniteLossError
from ..protocols import AfterOptimizerStep, as_method
from ..registry import create_model
from .checkpoint import prepare_output_dir
from .config import Config, save_config
from .distributed import DistInfo, all_reduce_mean, autocast, barrier, cleanup, init_distributed
from .logger import StepMetrics, TrainingLog, run_summary
from .online_probe import build_online_probe
from .optim import build_adamw, cosine_lr, plan_run
from .perf import flops_and_ceiling
from .run_state import check_finite_loss, resume_training, save_training, training_state
from .signals import StopSignals, stopped_message

__all__ = ["NonFiniteLossError", "StepMetrics", "StopSignals", "Trainer", "step_seed"]


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919) % (2**63 - 1)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dist: DistInfo = init_distributed(cfg.train.device)
        self.out_dir = Path(cfg.train.output_dir)
        self.stopped_by: int | None = None  # the signal that stopped fit() after a checkpoint, if one did
        self.last_saved_step: int | None = None  # step of the newest checkpoint.pt in out_dir
        removed = prepare_output_dir(self.out_dir) if self.dist.is_main else []
        if removed:
            self._log(f"removed {len(removed)} temporary file(s) left by an interrupted checkpoint write")
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank

        self.model = create_model(cfg.model_name, **cfg.model_overrides).to(self.dist.device)
        self.method = as_method(self.model)
        self.train_loader, self.dataset, self.sampler = build_pretrain_data(
            cfg.data, self.method, cfg.train.seed, self.dist.rank, self.dist.world_size
        )
        self.micro_per_epoch = len(self.train_loader)
        self.steps_per_epoch, self.total_steps, self.warmup_steps, self.global_batch, self.peak_lr = plan_run(
            cfg, self.micro_per_epoch, self.dist.world_size
        )
        if self.dist.is_main and cfg.data.source != "shards":
            for warning in pretrain_warnings(
                getattr(self.dataset, "base", self.dataset), self.method.config.in_chans, cfg.data.batch_size,
                self.dist.world_size, self.total_steps, self.warmup_steps,
            ):  # fmt: skip
                self._log(f"warning: {warning}")

        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.fsdp = self.dist.enabled and cfg.train.distributed == "fsdp"
        if self.fsdp:  # shards parameters in place: must precede the optimizer
            from .fsdp import shard_model

            shard_model(self.model, activation_checkpointing=cfg.train.activation_checkpointing)
        self.online_probe: nn.Module | None = None
        self.trained = {"model": self.model}  # what the optimizer updates, by checkpoint entry
        if cfg.train.online_probe:
            self.online_probe = build_online_probe(
                self.dataset, self.method.encoder.embed_dim, self.dist.device
            )
            self.trained["online_probe"] = self.online_probe
        self.optimizer = build_adamw(self.trained, cfg.optim, self.peak_lr, fused=not self.fsdp)
        self.step = 0
        self.micro_done = 0  # micro-batches consumed since the start of training
        if cfg.train.resume:
            self._resume(cfg.train.resume)
        self.train_model = self._wrap(self.model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """DDP (kept as `self.ddp` for its no_sync: torch.compile hides it), then torch.compile."""
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if self.dist.enabled and not self.fsdp:
            model = self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None
            )
        return torch.compile(model) if self.cfg.train.compile else model  # type: ignore[return-value]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The full training state, in a single-process layout; under FSDP a collective (rank 0 gets it)."""
        return training_state(self)

    def _resume(self, where: str) -> None:
        if (resumed := resume_training(self, where)) is not None:
            self._log(resumed)

    def save(self, name: str = "checkpoint.pt", export: bool = False) -> Path:
        """Write the training state (rank 0) and, with `export`, the encoder as safetensors beside it.

        Weights holding NaN or inf are never written (NonFiniteLossError): the checkpoint already there,
        written from finite weights, stays. A failed write (disk full, read-only) keeps it too (OutputError).
        """
        return save_training(self, name, export)

    # ---------------------------------------------------------------- loop
    def batches(self) -> Generator[Any, None, None]:
        """Micro-batches forever, starting at `micro_done`; epochs advance the sampler and the augmentations.

        For loops of your own (a time budget, a custom schedule): `b = trainer.batches()`, then
        `trainer.train_step(b)` as often as you like, `trainer.save()` at the end."""
        yield from micro_batches(
            self.train_loader, self.dataset, self.sampler, self.micro_done, self.cfg.data
        )

    def train_step(self, batches: Iterator[Any]) -> StepMetrics:
        """One optimizer step over `accum_steps` micro-batches. The metrics it returns stay on the device
        (no host-device sync here; reading one waits for the step to finish)."""
        cfg, dev = self.cfg, self.dist.device
        torch.manual_seed(step_seed(cfg.train.seed, self.step, self.dist.rank))  # drop-path etc.
        lr = cosine_lr(self.step, self.total_steps, self.peak_lr, self.warmup_steps, cfg.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum, totals = cfg.optim.accum_steps, dict[str, torch.Tensor]()
        for i in range(accum):
            images, mask, labels = next(batches)
            images, mask = images.to(dev, non_blocking=True), mask.to(dev, non_blocking=True)
            last = i == accum - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
            skip_sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with skip_sync, autocast(cfg.train.precision, dev):
                out = self.train_model(images, mask)
                loss, metrics = out.loss, {"loss": out.loss, **out.metrics}
                if self.online_probe is not None:
                    probe_loss, probe_acc = self.online_probe(out.features.detach(), labels.to(dev))
                    loss = loss + probe_loss
                    metrics |= {"probe_loss": probe_loss, "probe_acc": probe_acc}
            (loss / accum).backward()
            self.micro_done += 1
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / accum
        keys = sorted(totals)
        stats = dict(zip(keys, all_reduce_mean(torch.stack([totals[k] for k in keys]), self.dist)))
        if cfg.optim.clip_grad:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
            stats["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.model, AfterOptimizerStep):
            self.model.after_optimizer_step()
        self.step += 1
        return StepMetrics(stats, lr=lr)

    def fit(self) -> dict[str, float]:
        """Train to `total_steps`, logging and checkpointing; returns the last step's metrics.

        The loss is read back (a host-device sync) only every `train.log_every` steps: a loss that stops
        being finite is reported there, and `save` refuses non-finite weights in any case.
        SIGTERM or SIGINT (Ctrl-C) stops it cleanly: the current step finishes, a checkpoint is written, the
        data-loader workers stop, `stopped_by` holds the signal number and the resume command is printed.
        A second signal exits at once (the previous checkpoint stays; a partial write is cleaned next time).
        """
        cfg = self.cfg
        self.flops_per_image, self.ceiling = flops_and_ceiling(
            self.model, cfg.train.matmul_ceiling, cfg.train.precision, self.dist.device
        )
        if self.dist.is_main:
            save_config(cfg, self.out_dir / "config.yaml")
        self._log(run_summary(self))
        self.train_model.train()
        batches = self.batches()
        log = TrainingLog(
            self.out_dir, self.dist.is_main, self.step, self.total_steps, cfg.train.progress,
            self.global_batch, self.dist.world_size, self.flops_per_image, self.ceiling,
        )  # fmt: skip
        stats: StepMetrics | dict[str, float] = {}
        signals = StopSignals(verbose=self.dist.is_main)
        try:
            with signals:
                while self.step < self.total_steps:
                    stats = self.train_step(batches)
                    write = self.step % cfg.train.log_every == 0 or self.step == self.total_steps
                    if write:  # reads the step's metrics back: the only host-device sync of a log step
                        check_finite_loss(self, stats)
                    log.step(self.step, stats, write, epoch=self.micro_done / self.micro_per_epoch)
                    if self.step % cfg.train.ckpt_every == 0 or self.step == self.total_steps:
                        self.save(export=self.step == self.total_steps)
                    keep = cfg.train.keep_every_epochs
                    if keep and self.micro_done % (keep * self.micro_per_epoch) < cfg.optim.accum_steps:
                        self.save(f"checkpoint-epoch{self.micro_done // self.micro_per_epoch:04d}.pt")
                    if self.step < self.total_steps and (signum := signals.agreed(self.dist)):
                        self.stopped_by = signum  # every process saw it: all stop after this same step
                        break
                if self.stopped_by is not None:
                    if self.last_saved_step != self.step:
                        self.save()  # still under the handlers: a second signal interrupts it at once
                    batches.close()  # drops the loader's iterator: its workers are shut down now
                    self._log(stopped_message(self.stopped_by, self.step, self.total_steps, self.out_dir))
        finally:
            batches.close()
            log.close()
        if self.dist.is_main and (note := skipped_images_note(self.dataset, cfg.data)):
            self._log(note)
        barrier(self.dist)
        return dict(stats)

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[mimkit] {msg}", flush=True)

    def close(self) -> None:
        cleanup(self.dist)
