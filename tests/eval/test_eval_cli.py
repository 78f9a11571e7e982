"""`mimkit probe` / `mimkit finetune` end to end on synthetic data with a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from mimkit import create_model
from mimkit.cli import main
from mimkit.engine.checkpoint import save_model

TINY = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)  # fmt: skip
DATA = ["--data", "synthetic", "--max-train", "96", "--max-test", "40", "--batch-size", "32", "--no-progress"]


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    save_model(create_model("mae_vit_tiny_patch4_32", **TINY), path)
    return path


@pytest.mark.parametrize("protocol", ["knn", "linear", "attentive"])
def test_probe_cli_writes_json_summary_and_confusion_png(checkpoint, tmp_path, protocol):
    out = tmp_path / protocol
    extra = ["--epochs", "2"] if protocol != "knn" else []
    assert main(["probe", protocol, "--checkpoint", str(checkpoint), *DATA, *extra, "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["protocol"] == protocol and 0.0 <= result["accuracy"] <= 1.0
    cm = torch.tensor(result["confusion_matrix"])
    assert int(cm.sum()) == result["num_test"] == 40
    assert result["accuracy"] == pytest.approx(float(cm.diagonal().sum()) / 40)
    assert (out / "result.txt").read_text().startswith(protocol)
    assert (out / "result_confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "feature_cache").glob("features-*.pt"))  # train and test features cached
    assert result["config"]["bf16"] is False and result["config"].get("precision", "fp32") == "fp32"


def test_probe_cli_bf16_runs_the_attentive_probe_in_bf16(checkpoint, tmp_path):
    out = tmp_path / "att"
    argv = ["probe", "attentive", "--checkpoint", str(checkpoint), *DATA, "--epochs", "1", "--bf16"]
    assert main([*argv, "--out", str(out)]) == 0
    config = json.loads((out / "result.json").read_text())["config"]
    assert config["bf16"] is True and config["precision"] == "bf16"


def test_probe_cli_random_init_baseline_differs_from_checkpoint(checkpoint, tmp_path):
    args = ["probe", "knn", "--checkpoint", str(checkpoint), *DATA]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--random-init", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "result.json").read_text())
    b = json.loads((tmp_path / "b" / "result.json").read_text())
    assert a["model_key"]["checkpoint"]["path"].endswith("checkpoint.pt")
    assert b["model_key"]["init"] == "random" and b["model"] == a["model"]  # same architecture, no weights
    assert len(list((tmp_path / "feature_cache").glob("*.pt"))) == 4  # separate cache entries


def test_probe_cli_needs_a_model(tmp_path, capsys):
    assert main(["probe", "knn", *DATA, "--out", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_finetune_cli_partial(checkpoint, tmp_path):
    out = tmp_path / "ft"
    argv = [
        "finetune",
        "--checkpoint",
        str(checkpoint),
        *DATA,
        "--epochs",
        "1",
        "--blocks",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["blocks"] == 1 and 0.0 <= result["accuracy"] <= 1.0
    assert (out / "result_confusion.png").is_file() and (out / "classifier.pt").is_file()
    # last block (+ head) only: fewer trainable parameters than the whole classifier
    model = create_model("mae_vit_tiny_patch4_32", **TINY)
    block = sum(p.numel() for p in model.encoder.blocks[-1].parameters())
    head = 2 * 32 + (32 * 10 + 10)  # fc_norm + Linear over the synthetic data's 10 classes
    assert result["trainable_parameters"] == block + head


@pytest.mark.parametrize("flag", [["--crop-min", "0"], ["--crop-min", "1.5"], ["--lp-epochs", "-1"]])
def test_finetune_cli_rejects_bad_recipe_values_in_one_line(checkpoint, tmp_path, capsys, flag):
    argv = ["finetune", "--checkpoint", str(checkpoint), *DATA, "--out", str(tmp_path / "ft"), *flag]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert ("--crop-min" if flag[0] == "--crop-min" else "LP-FT") in err
