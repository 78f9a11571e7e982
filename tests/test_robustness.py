"""Every bad config and every fault gets one clear line (rc 2); a signal stops a run without losing it.

The matrix runs `mimkit.cli.main` in-process: a config is validated before anything is built, so each case
costs milliseconds. The signal tests run `mimkit pretrain` in a subprocess and signal it from outside.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from mimkit.cli import main
from mimkit.engine.checkpoint import load_checkpoint
from mimkit.engine.config import DataConfig, OptimConfig, TrainConfig
from mimkit.methods.cae import CAEConfig
from mimkit.methods.convmae import ConvMAEConfig
from mimkit.methods.mae import MAE, MAEConfig

# the trainer tests' micro model and data, as command-line overrides
MICRO = [
    "model.name=mae_vit_tiny_patch4_32", "model.img_size=16", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "data.source=synthetic", "data.num_samples=64", "data.num_workers=0", "data.batch_size=8",
    "train.precision=fp32", "optim.base_lr=1e-2", "optim.warmup_steps=2", "train.log_every=1",
    "train.progress=false", "train.matmul_ceiling=1e11",
]  # fmt: skip


def pretrain(out: Path, *args: str) -> int:
    return main(["pretrain", "--no-pictures", *MICRO, f"train.output_dir={out}", *args])


def the_error(capsys, command: str = "pretrain") -> str:
    """The one error line on stderr (warnings may precede it); fails on a traceback or a second error line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"mimkit {command}: ")]
    assert len(errors) == 1, err
    assert err.rstrip().endswith(errors[0]), err  # nothing after it
    return errors[0]


# ---------------------------------------------------------------------------------------------- bad configs
SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
ALL_KEYS = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
ALL_KEYS += [f"model.{f.name}" for f in dataclasses.fields(MAEConfig)]


def _hints(key: str):
    section, name = key.split(".")
    return typing.get_type_hints(MAEConfig if section == "model" else SECTIONS[section])[name]


def wrong_type(key_or_hint) -> str:
    """A value of the wrong type for the key's annotation (a list for strings, a word for numbers...)."""
    hint = _hints(key_or_hint) if isinstance(key_or_hint, str) else key_or_hint
    accepted = set(typing.get_args(hint)) | {hint}
    if str in accepted:
        return "{a: 1}"
    if bool in accepted:
        return "maybe"
    if any(typing.get_origin(a) is tuple for a in accepted):
        return "[1, 2, 3, 4, 5]" if int in accepted else "abc"
    return "abc"


# A value in range of the type but out of its allowed range, for every key that has a range.
OUT_OF_RANGE = {
    "data.source": "imagenet", "data.path": "''", "data.split": "''", "data.num_samples": "0",
    "data.batch_size": "0", "data.num_workers": "-1", "data.mean": "[]", "data.std": "[0.5, 0.0, 0.5]",
    "data.min_crop_scale": "2", "data.max_image_pixels": "0",
    "optim.base_lr": "-1e-3", "optim.lr": "-1", "optim.min_lr": "-1e-6", "optim.weight_decay": "-0.05",
    "optim.betas": "[0.9, 1.5]", "optim.warmup_epochs": "-1", "optim.warmup_steps": "-1",
    "optim.accum_steps": "0", "optim.clip_grad": "-1",
    "train.epochs": "0", "train.max_steps": "-5", "train.precision": "fp16", "train.seed": "-1",
    "train.output_dir": "''", "train.device": "tpu", "train.log_every": "0", "train.ckpt_every": "0",
    "train.keep_every_epochs": "0", "train.resume": "''", "train.distributed": "zero3",
    "train.matmul_ceiling": "0",
    "model.img_size": "0", "model.patch_size": "0", "model.in_chans": "0", "model.embed_dim": "0",
    "model.depth": "0", "model.num_heads": "0", "model.mlp_ratio": "0", "model.decoder_embed_dim": "0",
    "model.decoder_depth": "-1", "model.decoder_num_heads": "0", "model.mask_ratio": "1",
    "model.mask_kind": "checkerboard", "model.drop_path_rate": "1", "model.norm_eps": "0",
}  # fmt: skip
NO_RANGE = {  # any value of the right type is allowed
    "train.compile", "train.online_probe", "train.activation_checkpointing", "train.progress",
    "train.resume_force", "model.norm_pix_loss",
}  # fmt: skip
EXTRA_OUT_OF_RANGE = [  # the values the issue found accepted or crashing
    ("train.max_steps", "0"), ("train.epochs", "-1"), ("model.mask_ratio", "1.5"), ("model.mask_ratio", "-0.1"),
    ("model.mask_ratio", "0"), ("model.img_size", "[16, 0]"), ("optim.betas", "[0.9]"), ("train.seed", "1.5"),
    ("optim.betas", "[0.9, 0.95, 0.99]"), ("data.batch_size", "2.5"), ("data.mean", "[0.5]"),
]  # fmt: skip


OTHER_METHODS = {"cae_vit_tiny_patch4_32": CAEConfig, "convmae_tiny_patch8_64": ConvMAEConfig}
OTHER_OUT_OF_RANGE = {  # model keys that MAE does not have
    "regressor_depth": "-1", "align_weight": "-1", "momentum": "1", "layer_scale_init": "0",
    "decoder_layer_scale_init": "-0.1", "teacher_mode": "student", "tokenizer_path": "''", "vocab_size": "0",
    "target": "rgb", "strides": "[4, 0, 2]", "embed_dims": "[64, 0, 128]", "depths": "[1, 1, -1]",
    "dw_kernel": "0", "conv_norm_eps": "0",
}  # fmt: skip
OTHER_KEYS = sorted({(name, f.name) for name, cls in OTHER_METHODS.items() for f in dataclasses.fields(cls)})


@pytest.mark.parametrize("name, key", OTHER_KEYS, ids=lambda v: str(v))
def test_cae_and_convmae_keys_are_checked_too(name, key, capsys):
    hint = typing.get_type_hints(OTHER_METHODS[name])[key]
    for value in [wrong_type(hint)] + [OTHER_OUT_OF_RANGE.get(key) or OUT_OF_RANGE.get(f"model.{key}")]:
        if value is None:  # a key any value of its type suits (booleans)
            continue
        assert main(["pretrain", f"model.name={name}", f"model.{key}={value}"]) == 2
        assert f"model.{key}=" in the_error(capsys)


def test_every_key_is_in_the_matrix():
    """A key added without a range (or without saying it needs none) fails here, not in a user's run."""
    assert set(OUT_OF_RANGE) | NO_RANGE == set(ALL_KEYS)
    no_range = {
        "norm_pix_loss",
        "skip_masked",
        "use_regressor",
        "masked_conv",
        "multiscale_fusion",
    }  # booleans
    other = {key for _, key in OTHER_KEYS}
    assert (
        other
        <= {k.split(".")[1] for k in OUT_OF_RANGE if k.startswith("model.")}
        | set(OTHER_OUT_OF_RANGE)
        | no_range
    )


@pytest.mark.parametrize("key", ALL_KEYS)
def test_wrong_type_is_one_line_naming_the_key(key, tmp_path, capsys):
    assert pretrain(tmp_path / "run", f"{key}={wrong_type(key)}") == 2
    line = the_error(capsys)
    assert f"{key}=" in line and "wrong type: expected" in line, line
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


@pytest.mark.parametrize(
    "key, value", sorted(OUT_OF_RANGE.items()) + EXTRA_OUT_OF_RANGE, ids=lambda v: str(v)
)
def test_out_of_range_is_one_line_naming_the_key(key, value, tmp_path, capsys):
    assert pretrain(tmp_path / "run", f"{key}={value}") == 2
    line = the_error(capsys)
    assert f"{key}=" in line and "expected" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  epochs: [1,\n", "not valid YAML"),
        ("- model\n- data\n", "must hold a mapping of sections"),
        ("model: mae_vit_base_patch16_224\n", "section 'model' must be a mapping"),
        ("data: 5\n", "section 'data' must be a mapping"),
        ("trian:\n  epochs: 1\n", "unknown config section"),
        ("optim:\n  learning_rate: 1\n", "unknown key"),
        ("model:\n  name: mae_vit_bsae_patch16_224\n", "did you mean"),
        ("model:\n  depht: 3\n", "has no option"),
    ],
)
def test_bad_config_file_is_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert main(["pretrain", "--config", str(path)]) == 2
    assert message in the_error(capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "no/such/recipe.yaml"], "not found"),
        (["train.epochs"], "not of the form section.key=value"),
        (["epochs=3"], "must be section.key"),
        (["train.epochs=[1,"], "not valid YAML"),
    ],
)
def test_bad_command_line_is_one_line(args, message, capsys):
    assert main(["pretrain", *args]) == 2
    assert message in the_error(capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.num_heads=3"], "model.embed_dim=32 and model.num_heads=3 do not fit"),
        (
            ["model.decoder_num_heads=5"],
            "model.decoder_embed_dim=32 and model.decoder_num_heads=5 do not fit",
        ),
        (["model.patch_size=5"], "model.img_size=16 and model.patch_size=5 do not fit"),
        (["model.img_size=[16, 18]"], "model.img_size=[16, 18] and model.patch_size=4 do not fit"),
        (["data.source=folder", "data.path=null"], "data.path=null: expected a folder of images"),
        (["data.source=shards", "data.path=null"], "data.path=null: expected a shard pattern"),
    ],
)
def test_keys_that_must_fit_each_other_are_named(args, message, tmp_path, capsys):
    assert pretrain(tmp_path, *args) == 2
    assert message in the_error(capsys)


def test_an_override_after_a_flag_is_read(tmp_path, capsys):
    assert main(["pretrain", "--output-dir", str(tmp_path / "a"), "train.max_steps=0"]) == 2
    assert "train.max_steps=0" in the_error(capsys)  # read as an override, not "unrecognized arguments"
    assert (
        main(["pretrain", "--no-pictures", *MICRO, "--output-dir", str(tmp_path / "b"), "train.max_steps=1"])
        == 0
    )
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 1


class _FailsInAWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise ValueError("image 3 has 4 channels, mean/std have 3")


def test_an_error_raised_in_a_data_loader_worker_is_reported_as_its_own_line():
    from mimkit.errors import one_line

    loader = torch.utils.data.DataLoader(_FailsInAWorker(), num_workers=1)
    with pytest.raises(ValueError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # torch puts the worker's traceback into the message
    assert one_line(str(caught.value)) == "image 3 has 4 channels, mean/std have 3"


def test_other_commands_report_user_errors_in_one_line(tmp_path, capsys):
    rc = main(["visualize", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r.png")])
    assert rc == 2
    assert "missing.pt" in the_error(capsys, "visualize")


# ---------------------------------------------------------------------------------------------- signals
CHILD = """
import multiprocessing, sys, time
from mimkit.engine import trainer

step = trainer.Trainer.train_step
def slow_step(self, batches):  # slow the tiny steps down so that a signal lands mid-run
    stats = step(self, batches)
    time.sleep(float(sys.argv[1]))
    return stats
trainer.Trainer.train_step = slow_step

from mimkit.cli import main
rc = main(sys.argv[2:])
print("live children:", len(multiprocessing.active_children()), flush=True)
sys.exit(rc)
"""


def _start_child(tmp: Path, seconds_per_step: float, *args: str) -> subprocess.Popen:
    script = tmp / "child.py"
    script.write_text(CHILD)
    cmd = [sys.executable, str(script), str(seconds_per_step), "pretrain", "--no-pictures", *MICRO, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_rows(path: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{path} never reached {rows} rows")


def _weights_and_optimizer(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    state = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for i, s in ckpt["optimizer"]["state"].items():
        state |= {f"optim.{i}.{k}": v for k, v in s.items()}
    return state


def test_sigterm_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path, capsys):
    steps = ("train.max_steps=12", "train.ckpt_every=100")  # no regular checkpoint before the end
    out = tmp_path / "stopped"
    # a data-loader worker too: it must not outlive the run
    proc = _start_child(tmp_path, 0.15, f"train.output_dir={out}", "data.num_workers=1", *steps)
    _wait_for_rows(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "SIGTERM: finishing this step" in stderr
    assert f"Resume with: mimkit pretrain --config {out / 'config.yaml'} --resume auto" in stdout
    assert "live children: 0" in stdout
    stopped_at = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 3 <= stopped_at < 12

    # resume with the printed command, then compare with a run that was never stopped
    assert main(["pretrain", "--config", str(out / "config.yaml"), "--resume", "auto", "--no-pictures"]) == 0
    assert pretrain(tmp_path / "full", *steps) == 0
    resumed = _weights_and_optimizer(out / "checkpoint.pt")
    full = _weights_and_optimizer(tmp_path / "full" / "checkpoint.pt")
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 13))  # every step logged once across the stop


def test_a_second_signal_exits_at_once(tmp_path):
    out = tmp_path / "run"
    # 8 s steps: on a loaded machine both signals still land inside step 2's sleep, before the checkpoint
    proc = _start_child(tmp_path, 8.0, f"train.output_dir={out}", "train.max_steps=50")
    _wait_for_rows(out / "metrics.jsonl", 1, proc)  # inside the 8 s sleep of step 2
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.2)  # later than a launcher's forwarded copy of the first (taken as the same request)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < 1.5  # not after the step's remaining seconds
    assert proc.returncode == -signal.SIGTERM
    assert "second SIGTERM: exiting now" in stderr and "Traceback" not in stderr


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_data_loader_workers_die_with_a_killed_main_process(tmp_path):
    out = tmp_path / "run"
    args = (
        "data.num_workers=2",
        "data.num_samples=1024",
        "train.max_steps=200",
    )  # one epoch outlasts the test
    proc = _start_child(tmp_path, 0.2, f"train.output_dir={out}", *args)
    _wait_for_rows(out / "metrics.jsonl", 2, proc)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.kill()  # SIGKILL: no handler runs, no clean shutdown
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 2.0  # torch's own watchdog would take about 5 s
    while any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers):
        assert time.monotonic() < deadline, "a data-loader worker outlived the killed main process"
        time.sleep(0.02)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "gone"


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    """SIGINT in-process: fit() finishes the step, writes the checkpoint, restores the handlers; rc 130."""
    from mimkit.engine import trainer

    step = trainer.Trainer.train_step

    def interrupted_step(self, batches):
        stats = step(self, batches)
        if self.step == 3:  # a Ctrl-C in the middle of step 3, delivered twice (terminal + launcher)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return stats

    monkeypatch.setattr(trainer.Trainer, "train_step", interrupted_step)
    before = signal.getsignal(signal.SIGINT)
    assert pretrain(tmp_path, "train.max_steps=10") == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert "stopped by SIGINT at step 3 of 10" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- faults
def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert pretrain(tmp_path / "taken", "train.max_steps=1") == 2
    assert "is a file, not a folder" in the_error(capsys)


def test_output_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert pretrain(tmp_path / "taken" / "run", "train.max_steps=1") == 2
    assert "cannot write to train.output_dir" in the_error(capsys)


def test_read_only_output_dir(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    if os.access(out, os.W_OK):  # root writes into read-only folders; /sys refuses even root
        out = Path("/sys/mimkit-run")
        try:
            out.mkdir()
        except OSError:
            pass
        else:
            out.rmdir()
            pytest.skip("no folder here that this user cannot write to")
    try:
        assert pretrain(out, "train.max_steps=1") == 2
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert "cannot write to train.output_dir" in the_error(capsys)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import mimkit.engine.checkpoint as checkpoint

    real_save, calls = checkpoint.torch.save, []

    def filling_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", filling_save)
    assert pretrain(tmp_path, "train.max_steps=4", "train.ckpt_every=2") == 2
    line = the_error(capsys)
    assert "No space left on device" in line and "the previous checkpoint.pt is kept" in line
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_of_only_broken_images(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "b.png").write_text("text")
    args = ("data.source=folder", f"data.path={root}", "data.num_samples=null", "data.num_workers=1")
    with pytest.warns(RuntimeWarning):
        assert pretrain(tmp_path / "run", *args, "model.in_chans=3", "train.max_steps=1") == 2
    assert "no usable image under data.path" in the_error(capsys)


def test_shards_where_nothing_decodes_stop_with_one_line_instead_of_looping(tmp_path, capsys):
    from mimkit.data.shards import folder_to_shards

    (tmp_path / "img").mkdir()
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").write_text(f"not an image {i}")
    with pytest.warns(RuntimeWarning):
        folder_to_shards(tmp_path / "img", tmp_path / "shards", shard_size=3, verify=False)
        rc = pretrain(tmp_path / "run", "data.source=shards", f"data.path={tmp_path}/shards/train-{{0000..0001}}.tar",
                      "data.num_samples=null", "data.batch_size=2", "model.in_chans=3", "train.max_steps=2")  # fmt: skip
    assert rc == 2
    assert "epoch 0 gave no batch" in the_error(capsys)


def test_non_finite_loss_stops_without_writing_and_keeps_the_last_finite_checkpoint(
    tmp_path, monkeypatch, capsys
):
    forward, calls = MAE.forward, []

    def blowing_up(self, images, mask=None):
        out = forward(self, images, mask)
        calls.append(1)
        if len(calls) >= 3:  # the loss of step 3 (0-based step 2) is NaN
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(MAE, "forward", blowing_up)
    assert pretrain(tmp_path, "train.max_steps=5", "train.ckpt_every=2") == 2
    line = the_error(capsys)
    assert "loss is nan at step 2" in line and "from step 2 is the last finite one" in line
    assert "likely causes" in line and "optim.clip_grad" in line
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_non_finite_weights_are_never_written(tmp_path):
    from mimkit.engine.config import load_config
    from mimkit.engine.trainer import NonFiniteLossError, Trainer

    trainer = Trainer(load_config(None, MICRO + [f"train.output_dir={tmp_path}"]))
    trainer.save()
    with torch.no_grad():
        trainer.model.decoder_pred.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="checkpoint.pt was not written"):
        trainer.save()
    assert torch.isfinite(load_checkpoint(tmp_path / "checkpoint.pt")["model"]["decoder_pred.weight"]).all()


def test_oversized_images_are_skipped_without_decoding(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from mimkit.data.folder import ImageFolder
    from mimkit.engine.config import load_config
    from mimkit.engine.trainer import Trainer

    decode, decoded = ImageFolder.load, []

    def recording_decode(self, index):
        decoded.append(Path(self.samples[index][0]).name)
        return decode(self, index)

    monkeypatch.setattr(ImageFolder, "load", recording_decode)

    root = tmp_path / "images"
    root.mkdir()
    for i in range(12):
        Image.new("RGB", (12, 12), color=(i * 20, 50, 90)).save(root / f"ok{i}.png")
    Image.new("RGB", (40, 40)).save(root / "huge.png")  # 1600 pixels > the 400 allowed below
    overrides = ["data.source=folder", f"data.path={root}", "data.num_samples=null", "data.batch_size=4",
                 "data.max_image_pixels=400", "model.in_chans=3", "train.max_steps=6", f"train.output_dir={tmp_path / 'r'}"]  # fmt: skip
    with pytest.warns(RuntimeWarning, match="huge.png.*40x40 = 1,600 pixels, over data.max_image_pixels=400"):
        trainer = Trainer(load_config(None, MICRO + overrides))
        trainer.fit()
    assert trainer.step == 6 and trainer.dataset.num_bad == 1
    assert "huge.png" not in decoded and len(decoded) >= 24  # the others were decoded, the big one never
    assert "data.max_image_pixels=400" in capsys.readouterr().out


def test_oversized_images_in_shards_are_skipped_with_their_size(tmp_path):
    from PIL import Image

    from mimkit.data.shards import ShardDataset, folder_to_shards

    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("L", (8, 8), i * 40).save(tmp_path / "img" / f"{i}.png")
    Image.new("L", (30, 30)).save(tmp_path / "img" / "3-huge.png")
    folder_to_shards(tmp_path / "img", tmp_path / "shards", shard_size=4)
    ds = ShardDataset(str(tmp_path / "shards"), shuffle=False, in_chans=1, max_image_pixels=100)
    with pytest.warns(RuntimeWarning, match="30x30 = 900 pixels, over data.max_image_pixels=100"):
        images = [img for img, _ in ds]
    assert [im.size for im in images] == [(8, 8)] * 4  # the big one replaced by the previous sample
    assert ds.num_bad == 1


def test_a_poisoned_feature_cache_is_a_miss_and_is_rebuilt(tmp_path):
    import pickle

    from mimkit.eval.features import cache_key, cached_features
    from mimkit.registry import create_model

    model = create_model("mae_vit_tiny_patch4_32", img_size=16, depth=1, decoder_depth=1, in_chans=1)
    data = (torch.randn(6, 1, 16, 16), torch.arange(6))
    key = {"checkpoint": "x", "data": "y"}
    path = tmp_path / f"features-{cache_key(**key, pool='auto')}.pt"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for poison in (b"\x00garbage", pickle.dumps(Payload()), pickle.dumps({"features": 1})):
        path.write_bytes(poison)
        with pytest.warns(RuntimeWarning, match="ignoring the feature cache"):
            got = cached_features(model, data, tmp_path, key, progress=False, verbose=False)
        assert got["features"].shape[0] == 6 and not marker.exists()
        reused = cached_features(model, data, tmp_path, key, progress=False, verbose=False)  # now a hit
        assert torch.equal(reused["features"], got["features"])


def test_mimkit_probe_rebuilds_a_poisoned_feature_cache(tmp_path, capsys):
    from mimkit.engine.checkpoint import save_model
    from mimkit.registry import create_model

    tiny = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    ckpt = tmp_path / "run" / "checkpoint.pt"
    save_model(create_model("mae_vit_tiny_patch4_32", **tiny), ckpt)
    args = ["probe", "knn", "--checkpoint", str(ckpt), "--data", "synthetic", "--max-train", "64", "--max-test",
            "32", "--batch-size", "32", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    caches = sorted((tmp_path / "feature_cache").glob("features-*.pt"))
    assert len(caches) == 2
    caches[0].write_bytes(b"\x80\x04 truncated")
    caches[1].write_bytes(b"PK\x03\x04 not a zip either")
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="ignoring the feature cache"):
        assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in "ab")
    assert a["accuracy"] == b["accuracy"]


# ---------------------------------------------------------------------------------------------- leftovers
def test_stale_temporary_checkpoints_are_removed_on_start(tmp_path, capsys):
    tmp_path.joinpath(".checkpoint.pt.k3j4h5.tmp").write_bytes(b"half a checkpoint")
    assert pretrain(tmp_path, "train.max_steps=1") == 0
    assert not list(tmp_path.glob(".*.tmp"))
    assert "removed 1 temporary file(s)" in capsys.readouterr().out


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
    assert pretrain(tmp_path, "train.max_steps=2") == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a killed run had logged past its last checkpoint
        f.write("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (3, 4, 5)) + '{"step": 6, "lo')
    assert pretrain(tmp_path, "train.max_steps=4", "train.resume=auto") == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] != 9.0 for r in rows)


@pytest.mark.parametrize(
    "change, named",
    [("data.batch_size=16", "data.batch_size (checkpoint 8, now 16)"), ("train.seed=1", "train.seed"),
     ("model.mask_ratio=0.5", "model.mask_ratio (checkpoint 0.75, now 0.5)")],
)  # fmt: skip
def test_resume_with_a_different_batch_seed_or_mask_is_refused_unless_forced(tmp_path, capsys, change, named):
    assert pretrain(tmp_path, "train.max_steps=1") == 0
    capsys.readouterr()
    assert pretrain(tmp_path, "train.max_steps=2", "--resume", "auto", change) == 2
    line = the_error(capsys)
    assert named in line and "--force-resume" in line
    assert pretrain(tmp_path, "train.max_steps=2", "--resume", "auto", "--force-resume", change) == 0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "Ctrl-C to the process group"])
def test_a_signal_under_torchrun_checkpoints_every_process_at_the_same_step(tmp_path, how):
    """torchrun forwards the signal to its workers (after the terminal's own Ctrl-C reached them: the same
    request twice, not a second one); they agree on the step, rank 0 writes, the resume is exact."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out: Path, seconds_per_step: float, *args: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(seconds_per_step), "pretrain", "--no-pictures", *MICRO, f"train.output_dir={out}",
               "train.max_steps=10", "train.ckpt_every=100", *args]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # fmt: skip

    stopped = torchrun(tmp_path / "stopped", 0.3)
    _wait_for_rows(tmp_path / "stopped" / "metrics.jsonl", 2, stopped, timeout=240)
    if how == "SIGTERM to torchrun":
        stopped.send_signal(signal.SIGTERM)
    else:  # what a terminal does: every process of the foreground group, launcher and workers alike
        os.killpg(stopped.pid, signal.SIGINT)
    name = "SIGTERM" if how == "SIGTERM to torchrun" else "SIGINT"
    stdout, stderr = stopped.communicate(timeout=240)
    assert f"stopped by {name} at step" in stdout, stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and 2 <= ckpt["step"] < 10
    resumed = torchrun(tmp_path / "stopped", 0.0, "train.resume=auto")
    full = torchrun(tmp_path / "full", 0.0)
    for proc in (resumed, full):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    a = _weights_and_optimizer(tmp_path / "stopped" / "checkpoint.pt")
    b = _weights_and_optimizer(tmp_path / "full" / "checkpoint.pt")
    for k in b:
        assert torch.equal(a[k], b[k]), k
