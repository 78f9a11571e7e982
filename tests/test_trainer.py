"""The trainer: exact resume, DDP == accumulation, the non-finite guard, configs, atomic checkpoints."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimkit.engine.checkpoint import atomic_save, load_checkpoint, model_from_checkpoint
from mimkit.engine.config import load_config
from mimkit.engine.optim import cosine_lr, param_groups
from mimkit.engine.trainer import NonFiniteLossError, Trainer

MICRO = [
    "model.name=mae_vit_tiny_patch4_32", "model.img_size=16", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "data.source=synthetic", "data.num_samples=64", "data.num_workers=0", "train.precision=fp32",
    "optim.base_lr=1e-2", "optim.warmup_steps=2", "train.log_every=1", "train.progress=false",
    "train.matmul_ceiling=1e11",
]  # fmt: skip


def run_trainer(tmp: Path, *overrides: str) -> Trainer:
    cfg = load_config(None, MICRO + [f"train.output_dir={tmp}", *overrides])
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def stop_and_resume(tmp: Path, stop_after: int, *overrides: str) -> Trainer:
    """Train `stop_after` steps, checkpoint, then finish the run from that checkpoint in a new Trainer."""
    part = Trainer(load_config(None, MICRO + [f"train.output_dir={tmp}", *overrides]))
    batches = part.batches()
    for _ in range(stop_after):
        part.train_step(batches)
    part.save()
    return run_trainer(tmp, *overrides, "train.resume=auto")


def final_weights(trainer_or_path) -> dict[str, torch.Tensor]:
    if isinstance(trainer_or_path, Trainer):
        return {k: v.clone() for k, v in trainer_or_path.model.state_dict().items()}
    return load_checkpoint(trainer_or_path)["model"]


def assert_same(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"{k} differs")


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = run_trainer(tmp_path / "full", "train.max_steps=6", "data.batch_size=8")
    # 3 steps, stop; then resume to 6 with the same schedule (max_steps fixes the schedule length).
    resumed = stop_and_resume(tmp_path / "part", 3, "train.max_steps=6", "data.batch_size=8")
    assert resumed.step == 6
    assert_same(final_weights(full), final_weights(resumed))
    # and the run crossed an epoch boundary mid-way (64 samples / 8 = 8 micro-batches per epoch): not trivial
    assert full.micro_done == 6


def test_resume_mid_epoch_with_accumulation_crosses_epochs(tmp_path):
    args = ("train.max_steps=5", "data.batch_size=8", "optim.accum_steps=3")  # 15 micro-batches > 1 epoch
    full = run_trainer(tmp_path / "full", *args)
    resumed = stop_and_resume(tmp_path / "part", 2, *args)
    assert_same(final_weights(full), final_weights(resumed))


def test_checkpoint_holds_everything_needed_and_loads_weights_only(tmp_path):
    trainer = run_trainer(tmp_path, "train.max_steps=2", "data.batch_size=8")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("model", "optimizer", "step", "epoch", "batch_in_epoch", "rng", "config", "model_config"):
        assert key in ckpt
    assert ckpt["step"] == 2 and ckpt["config"]["data"]["batch_size"] == 8
    model = model_from_checkpoint(tmp_path / "checkpoint.pt")
    assert_same(model.state_dict(), trainer.model.state_dict())
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "encoder.safetensors").exists()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"img_per_sec"' in lines[0] and '"mfu"' in lines[0]


def test_exported_encoder_safetensors_matches_model(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mimkit.interop.export import export_safetensors

    trainer = run_trainer(tmp_path, "train.max_steps=1", "data.batch_size=8")
    exported = load_file(tmp_path / "encoder.safetensors")
    assert_same(exported, trainer.model.encoder.state_dict())
    # one encoder export: the trainer writes what `mimkit export --format safetensors --encoder-only` writes
    again = export_safetensors(tmp_path / "checkpoint.pt", tmp_path / "again", encoder_only=True)
    assert_same(load_file(again), exported)
    metadata = [
        safe_open(str(f), framework="pt").metadata() for f in (tmp_path / "encoder.safetensors", again)
    ]
    assert metadata[0] == metadata[1] and '"contents": "encoder"' in metadata[0]["mimkit"]


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    cfg = load_config(
        None, MICRO + [f"train.output_dir={tmp_path}", "train.max_steps=3", "data.batch_size=8"]
    )
    trainer = Trainer(cfg)
    with torch.no_grad():
        trainer.model.decoder_pred.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="lower optim.base_lr"):
        trainer.fit()


def test_lr_schedule_and_weight_decay_groups():
    assert cosine_lr(0, 100, 1.0, 10) == 0.0
    assert cosine_lr(5, 100, 1.0, 10) == pytest.approx(0.5)
    assert cosine_lr(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, 10, min_lr=0.1) == pytest.approx(0.55)
    assert cosine_lr(100, 100, 1.0, 10) == pytest.approx(0.0)
    import mimkit

    model = mimkit.create_model("mae_vit_tiny_patch4_32", depth=1, decoder_depth=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"encoder.blocks.0.norm1.weight", "decoder_pred.bias", "encoder.blocks.0.attn.qkv.bias"} <= skipped
    # the authors decay every tensor of 2+ dims that is not a bias, the class and mask tokens included
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.cls_token", "mask_token"} <= {
        names[id(p)] for p in decay["params"]
    }
    # frozen sin-cos position embeddings are not optimised at all
    assert "encoder.pos_embed" not in skipped | {names[id(p)] for p in decay["params"]}


def test_lr_scales_with_global_batch(tmp_path):
    cfg = load_config(None, MICRO + [f"train.output_dir={tmp_path}", "data.batch_size=8", "optim.accum_steps=4",
                                      "optim.base_lr=1e-3"])  # fmt: skip
    assert Trainer(cfg).peak_lr == pytest.approx(1e-3 * 32 / 256)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=1", "unknown key"),
        ("model.depht=3", "has no option"),
        ("model.name=mae_vit_bsae_patch16_224", "did you mean"),
        ("train.precision=fp16", "bf16"),
        ("data.source=imagenet", "valid sources"),
    ],
)
def test_bad_config_gets_a_clear_error(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        Trainer(load_config(None, MICRO + [f"train.output_dir={tmp_path}", override]))


def test_run_survives_a_folder_with_corrupt_files(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(20):
        Image.new("RGB", (20 + i, 17), color=(i * 10, 50, 200 - i * 5)).save(root / f"ok{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.png").write_text("this is text")
    with pytest.warns(RuntimeWarning):
        trainer = run_trainer(tmp_path / "run", "data.source=folder", f"data.path={root}", "data.num_samples=null",
                              "data.batch_size=4", "train.max_steps=6", "model.in_chans=3")  # fmt: skip
    assert trainer.step == 6
    assert trainer.dataset.num_bad == 2


def _torchrun(tmp: Path, nproc: int, *overrides: str, name: str = "") -> Path:
    out = tmp / (name or f"np{nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mimkit", "pretrain", "--no-pictures", *MICRO, f"train.output_dir={out}", *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "checkpoint.pt"


@pytest.mark.distributed
def test_two_processes_match_one_process_with_accumulation(tmp_path):
    """torchrun, 2 gloo processes x batch 8 == 1 process x 2 accumulated micro-batches of 8."""
    two = _torchrun(tmp_path, 2, "data.batch_size=8", "train.max_steps=4")
    one = _torchrun(tmp_path, 1, "data.batch_size=8", "optim.accum_steps=2", "train.max_steps=4")
    a, b = final_weights(one), final_weights(two)
    # The key bias gets a zero gradient in exact arithmetic (softmax ignores a shift shared by all keys), so
    # Adam turns its rounding noise into lr-sized steps that differ between reduction orders: compare the
    # q and v thirds of qkv.bias, and every other tensor whole.
    for key in [k for k in a if k.endswith("attn.qkv.bias")]:
        q_a, _, v_a = a.pop(key).chunk(3)
        q_b, _, v_b = b.pop(key).chunk(3)
        torch.testing.assert_close(torch.cat([q_a, v_a]), torch.cat([q_b, v_b]), atol=2e-6, rtol=0)
    assert_same(a, b, atol=2e-6)
    init = Trainer(load_config(None, MICRO + [f"train.output_dir={tmp_path / 'x'}"])).model.state_dict()
    assert not torch.allclose(a["decoder_pred.weight"], init["decoder_pred.weight"])  # it did train


def test_compiled_ddp_skips_the_all_reduce_on_all_but_the_last_micro_batch(tmp_path, monkeypatch):
    """With train.compile the model is torch.compile(DDP(model)); no_sync must still reach the DDP module."""
    import contextlib

    import torch.distributed as dist

    from mimkit.engine import trainer as trainer_module
    from mimkit.engine.distributed import DistInfo

    class OneProcessGroup(DistInfo):  # a real gloo group of one process, treated as distributed
        enabled = property(lambda self: True)

    class Compiled(torch.nn.Module):  # what torch.compile returns: a module wrapping, not subclassing, DDP
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    entered = []
    plain_no_sync = torch.nn.parallel.DistributedDataParallel.no_sync

    @contextlib.contextmanager
    def counting_no_sync(self):
        entered.append(1)
        with plain_no_sync(self):
            yield

    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "no_sync", counting_no_sync)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: Compiled(model))
    monkeypatch.setattr(trainer_module, "init_distributed", lambda device: OneProcessGroup())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = load_config(None, MICRO + [f"train.output_dir={tmp_path}", "data.batch_size=4",
                                         "optim.accum_steps=3", "train.compile=true"])  # fmt: skip
        trainer = Trainer(cfg)
        assert isinstance(trainer.train_model, Compiled)
        trainer.train_step(trainer.batches())
        assert len(entered) == 2  # micro-batches 1 and 2 accumulate locally; the 3rd all-reduces
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp_matches_ddp_and_its_checkpoint_loads_in_one_process(tmp_path):
    args = ("data.batch_size=8", "train.max_steps=3", "optim.accum_steps=2", "optim.clip_grad=1.0")
    ddp = final_weights(_torchrun(tmp_path, 2, *args, name="ddp"))
    fsdp_ckpt = _torchrun(tmp_path, 2, *args, "train.distributed=fsdp", name="fsdp")
    fsdp = final_weights(fsdp_ckpt)
    for key in [k for k in ddp if k.endswith("attn.qkv.bias")]:  # see the test above for the key bias
        ddp[key], fsdp[key] = ddp[key].chunk(3)[0], fsdp[key].chunk(3)[0]
    assert_same(ddp, fsdp, atol=2e-6)
    model = model_from_checkpoint(fsdp_ckpt)  # a single-process model from an FSDP run's checkpoint
    assert torch.equal(model.state_dict()["decoder_pred.weight"], fsdp["decoder_pred.weight"])


def test_streaming_shards_train_and_resume_exactly(tmp_path):
    from PIL import Image

    from mimkit.data.shards import folder_to_shards

    root = tmp_path / "images"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (18, 18), color=(i * 20, c * 200, 90)).save(root / f"class{c}" / f"{i}.png")
    folder_to_shards(root, tmp_path / "shards", shard_size=5)
    pattern = str(tmp_path / "shards" / "train-{0000..0004}.tar")
    args = ("data.source=shards", f"data.path={pattern}", "data.num_samples=null", "data.batch_size=4",
            "train.max_steps=8", "model.in_chans=3")  # fmt: skip  # 24 samples = 6 batches/epoch
    full = run_trainer(tmp_path / "full", *args)
    resumed = stop_and_resume(tmp_path / "part", 3, *args)
    assert_same(final_weights(full), final_weights(resumed))


def test_online_probe_logs_accuracy_without_touching_pretraining(tmp_path):
    plain = run_trainer(tmp_path / "plain", "train.max_steps=3", "data.batch_size=8")
    probed = run_trainer(
        tmp_path / "probed", "train.max_steps=3", "data.batch_size=8", "train.online_probe=true"
    )
    assert '"probe_acc"' in (tmp_path / "probed" / "metrics.jsonl").read_text()
    # the probe sees detached features: the pretrained weights are exactly those of the run without it
    assert_same(final_weights(plain), final_weights(probed))


@pytest.mark.parametrize(
    "recipe", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_recipe_loads_and_the_cpu_ones_train_a_step(recipe, tmp_path):
    cfg = load_config(recipe)  # validates keys, the model name and the model's options
    assert cfg.model_name.split("_")[0] in recipe.name
    if "tiny" not in cfg.model_name:
        return  # ImageNet-sized models: validated, not built
    small = ["data.source=synthetic", "data.num_samples=8", "data.batch_size=4", "data.num_workers=0",
             "train.max_steps=1", "train.progress=false", f"train.output_dir={tmp_path}"]  # fmt: skip
    if cfg.model.get("tokenizer_path"):  # a token-target recipe: stand in a small untrained tokenizer
        from test_tokenizer import small_vq

        from mimkit.tokenizers import save_tokenizer

        small.append(f"model.tokenizer_path={save_tokenizer(small_vq(), tmp_path / 'tok.safetensors')}")
    trainer = Trainer(load_config(recipe, small))
    assert math.isfinite(trainer.fit()["loss"])


def test_pretrain_help_lists_every_config_key_and_the_recipes(capsys):
    import dataclasses

    from mimkit.cli import main as cli
    from mimkit.engine.config import SECTIONS

    with pytest.raises(SystemExit):
        cli(["pretrain", "--help"])
    text = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{section}:"))
        assert all(f"{f.name}=" in line for f in dataclasses.fields(cls)), section
    assert "list-models" in text and "mae_photos_cpu.yaml" in text
