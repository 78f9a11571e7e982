"""How many bad configs and faults get one clear line (no traceback, the key or the fix named); prints JSON.

    python benchmarks/robustness_matrix.py            # ~1 minute on 2 CPU cores
    python benchmarks/robustness_matrix.py --no-signals

Bad configs: every key of every config section and of the MAE, CAE and ConvMAE models, with a value of the
wrong type and one out of range, the values found accepted or crashing in issue 14, and broken YAML files. Faults: output
folders that cannot be written, a full disk, unreadable data, a NaN loss, an oversized image, a poisoned
feature cache, leftovers of a killed run, a mismatched resume and SIGTERM (once and twice). Other commands:
a missing or non-mimkit checkpoint for probe / finetune / visualize / export / import, a missing folder.

A case counts as "one clear line" when `mimkit` exits with the expected status, prints no traceback, and
its last stderr line is the one `mimkit <command>: error: ...` line (or, for faults it survives, a single
warning or message) containing the expected words.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import typing
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from mimkit.cli import main
from mimkit.engine.config import DataConfig, OptimConfig, TrainConfig
from mimkit.methods.cae import CAEConfig
from mimkit.methods.convmae import ConvMAEConfig
from mimkit.methods.mae import MAE, MAEConfig

MICRO = [
    "model.name=mae_vit_tiny_patch4_32", "model.img_size=16", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    "data.source=synthetic", "data.num_samples=64", "data.num_workers=0", "data.batch_size=8",
    "train.precision=fp32", "optim.warmup_steps=2", "train.log_every=1", "train.progress=false",
    "train.matmul_ceiling=1e11",
]  # fmt: skip
SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
OUT_OF_RANGE = {  # a value of the right type outside what the key allows
    "data.source": "imagenet", "data.path": "''", "data.split": "''", "data.num_samples": "0",
    "data.batch_size": "0", "data.num_workers": "-1", "data.mean": "[]", "data.std": "[0.5, 0, 0.5]",
    "data.min_crop_scale": "2", "data.max_image_pixels": "0", "optim.base_lr": "-1e-3", "optim.lr": "-1",
    "optim.min_lr": "-1e-6", "optim.weight_decay": "-0.05", "optim.betas": "[0.9, 1.5]",
    "optim.warmup_epochs": "-1", "optim.warmup_steps": "-1", "optim.accum_steps": "0", "optim.clip_grad": "-1",
    "train.epochs": "0", "train.max_steps": "-5", "train.precision": "fp16", "train.seed": "-1",
    "train.output_dir": "''", "train.device": "tpu", "train.log_every": "0", "train.ckpt_every": "0",
    "train.keep_every_epochs": "0", "train.resume": "''", "train.distributed": "zero3",
    "train.matmul_ceiling": "0", "model.img_size": "0", "model.patch_size": "0", "model.in_chans": "0",
    "model.embed_dim": "0", "model.depth": "0", "model.num_heads": "0", "model.mlp_ratio": "0",
    "model.decoder_embed_dim": "0", "model.decoder_depth": "-1", "model.decoder_num_heads": "0",
    "model.mask_ratio": "1", "model.mask_kind": "checkerboard", "model.drop_path_rate": "1",
    "model.norm_eps": "0",
}  # fmt: skip
OTHER_OUT_OF_RANGE = {  # CAE / ConvMAE model keys
    "regressor_depth": "-1", "align_weight": "-1", "momentum": "1", "layer_scale_init": "0",
    "decoder_layer_scale_init": "-0.1", "teacher_mode": "student", "tokenizer_path": "''", "vocab_size": "0",
    "target": "rgb", "strides": "[4, 0, 2]", "embed_dims": "[64, 0, 128]", "depths": "[1, 1, -1]",
    "dw_kernel": "0", "conv_norm_eps": "0",
}  # fmt: skip
ISSUE_VALUES = [  # issue 14's list: accepted silently or a traceback before
    ("train.epochs", "abc"), ("data.batch_size", "abc"), ("optim.base_lr", "abc"), ("train.max_steps", "0"),
    ("train.epochs", "-1"), ("optim.betas", "[0.9]"), ("train.seed", "1.5"), ("model.mask_ratio", "1.5"),
    ("model.mask_ratio", "-0.1"), ("model.mask_ratio", "0"), ("optim.clip_grad", "-1"),
]  # fmt: skip
BAD_FILES = [
    ("train:\n  epochs: [1,\n", "not valid YAML"), ("- model\n- data\n", "mapping of sections"),
    ("model: mae_vit_base_patch16_224\n", "section 'model' must be a mapping"),
    ("data: 5\n", "section 'data' must be a mapping"), ("trian:\n  epochs: 1\n", "unknown config section"),
    ("optim:\n  learning_rate: 1\n", "unknown key"), ("model:\n  name: mae_vit_bsae_patch16_224\n", "did you mean"),
    ("model:\n  depht: 3\n", "has no option"),
]  # fmt: skip


@dataclasses.dataclass
class Outcome:
    rc: int | None
    out: str
    err: str


def run_cli(argv: list[str]) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default")
        try:
            rc = main(argv)
        except BaseException as e:  # a crash counts as unclear, whatever it was  # noqa: BLE001
            import traceback

            err.write("Traceback (uncaught)\n" + "".join(traceback.format_exception(e)))
            rc = None
    return Outcome(rc, out.getvalue(), err.getvalue())


def one_clear_line(o: Outcome, rc: int, words: list[str], command: str = "pretrain") -> bool:
    lines = [line for line in o.err.splitlines() if line.strip()]
    if o.rc != rc or "Traceback" in o.err or not lines:
        return False
    errors = [line for line in lines if line.startswith(f"mimkit {command}: error: ")]
    return len(errors) == 1 and lines[-1] == errors[0] and all(w in errors[0] for w in words)


def wrong_type(hint) -> str:
    accepted = set(typing.get_args(hint)) | {hint}
    if str in accepted:
        return "{a: 1}"
    if bool in accepted:
        return "maybe"
    return (
        "[1, 2, 3, 4, 5]"
        if any(typing.get_origin(a) is tuple for a in accepted) and int in accepted
        else "abc"
    )


def bad_config_cases(tmp: Path) -> list[tuple[str, Callable[[], bool]]]:
    out = str(tmp / "never-written")
    cases = []

    def override(key: str, value: str, words: list[str]):
        return lambda: one_clear_line(
            run_cli(["pretrain", "--no-pictures", *MICRO, f"train.output_dir={out}", f"{key}={value}"]),
            2,
            words,
        )

    hints = {f"{s}.{k}": h for s, cls in SECTIONS.items() for k, h in typing.get_type_hints(cls).items()}
    hints |= {f"model.{k}": h for k, h in typing.get_type_hints(MAEConfig).items()}
    for key, hint in hints.items():
        cases.append((f"{key}={wrong_type(hint)}", override(key, wrong_type(hint), [f"{key}=", "expected"])))
    for key, value in list(OUT_OF_RANGE.items()) + ISSUE_VALUES:
        cases.append((f"{key}={value}", override(key, value, [f"{key}=", "expected"])))
    for name, cls in (("cae_vit_tiny_patch4_32", CAEConfig), ("convmae_tiny_patch8_64", ConvMAEConfig)):
        for key, hint in typing.get_type_hints(cls).items():
            bad = [wrong_type(hint), OTHER_OUT_OF_RANGE.get(key) or OUT_OF_RANGE.get(f"model.{key}")]
            for value in filter(None, bad):
                argv = ["pretrain", f"model.name={name}", f"model.{key}={value}"]
                check = lambda a=argv, k=key: one_clear_line(run_cli(a), 2, [f"model.{k}=", "expected"])  # noqa: E731
                cases.append((f"{name}: model.{key}={value}", check))
    for args, words in [
        (["model.num_heads=3"], "model.num_heads=3 do not fit"), (["model.patch_size=5"], "model.patch_size=5 do not fit"),
        (["model.decoder_num_heads=5"], "model.decoder_num_heads=5 do not fit"),
        (["data.source=folder", "data.path=null"], "data.path=null"), (["data.source=shards", "data.path=null"], "data.path=null"),
    ]:  # fmt: skip
        argv = ["pretrain", "--no-pictures", *MICRO, f"train.output_dir={out}", *args]
        cases.append((" ".join(args), lambda a=argv, w=words: one_clear_line(run_cli(a), 2, [w])))
    for i, (text, words) in enumerate(BAD_FILES):
        path = tmp / f"bad{i}.yaml"
        path.write_text(text)
        cases.append((f"file: {text.splitlines()[0]}", lambda p=path, w=words: one_clear_line(run_cli(["pretrain", "--config", str(p)]), 2, [w])))  # fmt: skip
    cases.append(("config is a folder", lambda: one_clear_line(run_cli(["pretrain", "--config", str(tmp)]), 2, ["not found"])))  # fmt: skip
    cases.append(("override without =", lambda: one_clear_line(run_cli(["pretrain", "train.epochs"]), 2, ["section.key=value"])))  # fmt: skip
    cases.append(("override after a flag", lambda: one_clear_line(run_cli(["pretrain", "--output-dir", out, "train.max_steps=0"]), 2, ["train.max_steps=0"])))  # fmt: skip
    return cases


def pretrain(out: Path, *args: str) -> Outcome:
    return run_cli(["pretrain", "--no-pictures", *MICRO, f"train.output_dir={out}", *args])


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def fault_cases(tmp: Path, signals: bool) -> list[tuple[str, Callable[[], bool]]]:
    def output_is_file():
        (tmp / "file").write_text("x")
        return one_clear_line(pretrain(tmp / "file", "train.max_steps=1"), 2, ["is a file"])

    def output_under_file():
        (tmp / "file2").write_text("x")
        return one_clear_line(pretrain(tmp / "file2" / "run", "train.max_steps=1"), 2, ["cannot write"])

    def output_read_only():
        ro = tmp / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro if not os.access(ro, os.W_OK) else Path("/sys/mimkit-run")  # root: /sys refuses even root
        try:
            return one_clear_line(pretrain(target, "train.max_steps=1"), 2, ["cannot write"])
        finally:
            ro.chmod(0o700)

    def disk_full():
        import mimkit.engine.checkpoint as checkpoint

        real, calls = checkpoint.torch.save, []

        def save(obj, f, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(obj, f, *a, **k)

        with patched(checkpoint.torch, "save", save):
            o = pretrain(tmp / "full", "train.max_steps=4", "train.ckpt_every=2")
        kept = torch.load(tmp / "full" / "checkpoint.pt", weights_only=True)["step"] == 2
        return kept and one_clear_line(o, 2, ["No space left", "previous checkpoint.pt is kept"])

    def only_broken_images():
        root = tmp / "broken"
        root.mkdir()
        (root / "a.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        (root / "b.png").write_text("text")
        o = pretrain(tmp / "b-run", "data.source=folder", f"data.path={root}", "model.in_chans=3",
                     "data.num_workers=1", "train.max_steps=1")  # fmt: skip
        return one_clear_line(o, 2, ["no usable image"])

    def missing_folder():
        o = pretrain(tmp / "m-run", "data.source=folder", f"data.path={tmp / 'nothing'}", "model.in_chans=3")
        return one_clear_line(o, 2, ["does not exist"])

    def nan_loss():
        forward, calls = MAE.forward, []

        def blowing_up(self, images, mask=None):
            out = forward(self, images, mask)
            calls.append(1)
            return dataclasses.replace(out, loss=out.loss * float("nan")) if len(calls) >= 3 else out

        with patched(MAE, "forward", blowing_up):
            o = pretrain(tmp / "nan", "train.max_steps=5", "train.ckpt_every=2")
        kept = torch.load(tmp / "nan" / "checkpoint.pt", weights_only=True)["step"] == 2
        return kept and one_clear_line(o, 2, ["loss is nan", "last finite one", "likely causes"])

    def corrupt_checkpoint():
        (tmp / "cc").mkdir()
        (tmp / "cc" / "checkpoint.pt").write_bytes(b"\x00" * 100)
        return one_clear_line(pretrain(tmp / "cc", "train.resume=auto"), 2, ["could not be loaded safely"])

    def resume_mismatch():
        pretrain(tmp / "mm", "train.max_steps=1")
        o = pretrain(tmp / "mm", "train.max_steps=2", "train.resume=auto", "data.batch_size=16")
        return one_clear_line(o, 2, ["data.batch_size (checkpoint 8, now 16)", "--force-resume"])

    def oversized_image():
        from PIL import Image

        root = tmp / "big"
        root.mkdir()
        for i in range(8):
            Image.new("RGB", (12, 12), (i * 30, 9, 9)).save(root / f"ok{i}.png")
        Image.new("RGB", (40, 40)).save(root / "huge.png")
        o = pretrain(tmp / "big-run", "data.source=folder", f"data.path={root}", "model.in_chans=3",
                     "data.batch_size=4", "data.max_image_pixels=400", "train.max_steps=2")  # fmt: skip
        said = [line for line in o.err.splitlines() if "huge.png" in line]
        return o.rc == 0 and len(said) == 1 and "over data.max_image_pixels=400" in said[0]

    def poisoned_cache():
        from mimkit.eval.features import cache_key, cached_features
        from mimkit.registry import create_model

        model = create_model("mae_vit_tiny_patch4_32", img_size=16, depth=1, decoder_depth=1, in_chans=1)
        data, key = (torch.randn(4, 1, 16, 16), torch.arange(4)), {"k": 1}
        path = tmp / f"features-{cache_key(**key, pool='auto')}.pt"
        path.write_bytes(pickle.dumps({"features": "planted"}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = cached_features(model, data, tmp, key, progress=False, verbose=False)
        return (
            len(caught) == 1
            and "ignoring the feature cache" in str(caught[0].message)
            and len(got["features"]) == 4
        )

    def stale_tmp():
        (tmp / "st").mkdir()
        (tmp / "st" / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half")
        o = pretrain(tmp / "st", "train.max_steps=1")
        return o.rc == 0 and not list((tmp / "st").glob(".*.tmp")) and "removed 1 temporary file" in o.out

    cases = [
        ("output dir is a file", output_is_file), ("output dir under a file", output_under_file),
        ("output dir read-only", output_read_only), ("disk full on checkpoint write", disk_full),
        ("folder of only broken images", only_broken_images), ("data folder missing", missing_folder),
        ("non-finite loss", nan_loss), ("corrupt checkpoint on resume", corrupt_checkpoint),
        ("resume with another batch size", resume_mismatch), ("oversized image", oversized_image),
        ("poisoned feature cache", poisoned_cache), ("stale temporary checkpoint", stale_tmp),
    ]  # fmt: skip
    if signals:
        cases += [("SIGTERM mid-run", lambda: sigterm(tmp, twice=False)), ("second SIGTERM", lambda: sigterm(tmp, twice=True))]  # fmt: skip
    return cases


def other_command_cases(tmp: Path) -> list[tuple[str, Callable[[], bool]]]:
    """User errors in the other commands: a missing or non-mimkit checkpoint, a missing image folder."""
    junk = tmp / "junk.pt"
    junk.write_text("not a checkpoint")
    missing = str(tmp / "missing.pt")
    runs = [
        ("probe knn, missing checkpoint", "probe", ["probe", "knn", "--checkpoint", missing, "--data", "synthetic", "--out", str(tmp / "p")]),
        ("finetune, missing checkpoint", "finetune", ["finetune", "--checkpoint", missing, "--data", "synthetic", "--out", str(tmp / "f")]),
        ("visualize, not a checkpoint", "visualize", ["visualize", "--checkpoint", str(junk), "--out", str(tmp / "v.png")]),
        ("export, not a checkpoint", "export", ["export", "--format", "timm", "--checkpoint", str(junk), "--out", str(tmp / "e.safetensors")]),
        ("import, not a checkpoint", "import", ["import", "--from", "mae", str(junk), "--out", str(tmp / "i.pt")]),
        ("shards, missing folder", "shards", ["shards", "--src", str(tmp / "nothing"), "--out", str(tmp / "s")]),
    ]  # fmt: skip
    return [
        (label, lambda c=cmd, a=argv: one_clear_line(run_cli(a), 2, [], command=c))
        for label, cmd, argv in runs
    ]


CHILD = """
import sys, time
from mimkit.engine import trainer
step = trainer.Trainer.train_step
def slow(self, b):
    s = step(self, b); time.sleep(float(sys.argv[1])); return s
trainer.Trainer.train_step = slow
from mimkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def sigterm(tmp: Path, twice: bool) -> bool:
    out = tmp / ("sig2" if twice else "sig1")
    script = tmp / "child.py"
    script.write_text(CHILD)
    cmd = [sys.executable, str(script), "4.0" if twice else "0.2", "pretrain", "--no-pictures", *MICRO,
           f"train.output_dir={out}", "train.max_steps=40", "data.num_workers=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    if twice:
        time.sleep(1.2)  # a copy within 1 s is taken as the same request (terminal + torchrun)
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if "Traceback" in stderr:
        return False
    if twice:
        return proc.returncode == -signal.SIGTERM and "second SIGTERM: exiting now" in stderr
    ckpt = out / "checkpoint.pt"
    return proc.returncode == 143 and ckpt.exists() and "Resume with: mimkit pretrain" in stdout


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-signals", action="store_true", help="skip the two subprocess signal cases")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "faults").mkdir()
        (tmp / "other").mkdir()
        for name, cases in (
            ("bad_configs", bad_config_cases(tmp)),
            ("faults", fault_cases(tmp / "faults", signals=not args.no_signals)),
            ("other_commands", other_command_cases(tmp / "other")),
        ):
            unclear = [label for label, case in cases if not case()]
            result[name] = {
                "tried": len(cases),
                "one_clear_line": len(cases) - len(unclear),
                "unclear": unclear,
            }
    tried = sum(r["tried"] for r in result.values())
    clear = sum(r["one_clear_line"] for r in result.values())
    result["summary"] = (
        f"of {result['bad_configs']['tried']} bad configs and {result['faults']['tried']} faults tried in "
        f"pretrain, and {result['other_commands']['tried']} user errors in other commands, {clear} of {tried} "
        "gave one clear line"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main_()
