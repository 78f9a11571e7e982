"""The engine's pieces on their own: metrics that stay on the device until a log step, the optimizer state
through torch.distributed.checkpoint in optimizer.state_dict()'s layout, the run plan."""

from __future__ import annotations

import pytest
import torch

import mimkit
from mimkit.engine.checkpoint import load_optimizer_state, optimizer_state
from mimkit.engine.config import load_config
from mimkit.engine.logger import StepMetrics
from mimkit.engine.optim import build_adamw, plan_run
from mimkit.engine.trainer import Trainer

MICRO = [
    "model.name=mae_vit_tiny_patch4_32", "model.img_size=16", "model.embed_dim=32", "model.depth=1",
    "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "data.source=synthetic", "data.num_samples=32", "data.num_workers=0", "data.batch_size=8",
    "train.precision=fp32", "optim.warmup_steps=1", "train.progress=false", "train.matmul_ceiling=1e11",
]  # fmt: skip


def test_step_metrics_are_read_once_and_only_when_asked(monkeypatch):
    transfers = []
    tolist = torch.Tensor.tolist

    def counting(self):
        transfers.append(1)
        return tolist(self)

    stats = StepMetrics({"loss": torch.tensor(2.0), "acc": torch.tensor(0.5)}, lr=0.1)
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    assert list(stats) == ["acc", "loss", "lr"] and len(stats) == 3 and not transfers  # keys: no read
    assert stats["loss"] == 2.0 and dict(stats) == {"acc": 0.5, "loss": 2.0, "lr": 0.1}
    assert len(transfers) == 1  # every value in one transfer, then cached


def test_fit_reads_the_metrics_only_on_log_steps(tmp_path, monkeypatch):
    computed = []
    read = StepMetrics.read

    def counting(self):
        if self._values is None:
            computed.append(1)
        return read(self)

    monkeypatch.setattr(StepMetrics, "read", counting)
    cfg = load_config(
        None, MICRO + [f"train.output_dir={tmp_path}", "train.max_steps=6", "train.log_every=3"]
    )
    stats = Trainer(cfg).fit()
    assert stats["loss"] > 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # steps 3 and 6
    assert len(computed) == 2  # steps 3 and 6 waited for their values; steps 1, 2, 4, 5 never did


def test_a_nan_loss_between_log_steps_is_caught_at_the_next_one(tmp_path):
    from mimkit.errors import NonFiniteLossError

    cfg = load_config(
        None, MICRO + [f"train.output_dir={tmp_path}", "train.max_steps=6", "train.log_every=4"]
    )
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.decoder_pred.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="at step 3 "):  # 0-based index of the 4th step
        trainer.fit()
    assert trainer.step == 4 and not (tmp_path / "checkpoint.pt").exists()


def test_optimizer_state_keeps_the_integer_ids_of_optimizer_state_dict():
    model = mimkit.create_model("mae_vit_tiny_patch4_32", img_size=16, embed_dim=32, depth=1, num_heads=2)
    probe = torch.nn.Linear(32, 3)
    modules = {"model": model, "online_probe": probe}
    cfg = load_config(None, MICRO).optim
    opt = build_adamw(modules, cfg, lr=1e-3, fused=False)
    assert optimizer_state(modules, opt) == opt.state_dict()  # before any step: the plain state dict
    images = torch.randn(2, 3, 16, 16)
    (model(images).loss + probe(torch.randn(2, 32)).sum()).backward()
    opt.step()
    state = optimizer_state(modules, opt)
    plain = opt.state_dict()
    assert state["param_groups"] == plain["param_groups"] and state["state"].keys() == plain["state"].keys()
    for i, entry in plain["state"].items():
        for key, value in entry.items():
            assert torch.equal(state["state"][i][key], value), (i, key)
    # and back into a fresh optimizer over fresh modules: the same state, not shared tensors
    twin = {"model": mimkit.create_model("mae_vit_tiny_patch4_32", img_size=16, embed_dim=32, depth=1,
                                         num_heads=2), "online_probe": torch.nn.Linear(32, 3)}  # fmt: skip
    opt2 = build_adamw(twin, cfg, lr=1e-3, fused=False)
    load_optimizer_state(twin, opt2, state)
    for i, entry in opt2.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, plain["state"][i][key])
            assert value.data_ptr() != plain["state"][i][key].data_ptr()


def test_the_run_plan_follows_batch_accumulation_and_processes():
    cfg = load_config(None, MICRO + ["optim.accum_steps=2", "optim.base_lr=1e-3", "train.epochs=3"])
    plan = plan_run(cfg, micro_per_epoch=8, world_size=4)
    assert plan.global_batch == 8 * 2 * 4 and plan.steps_per_epoch == 4 and plan.total_steps == 12
    assert plan.peak_lr == pytest.approx(1e-3 * 64 / 256) and plan.warmup_steps == 1
    with pytest.raises(ValueError, match="fewer than optim.accum_steps=2"):
        plan_run(cfg, micro_per_epoch=1, world_size=1)
