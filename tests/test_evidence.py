"""Machinery of the evidence benchmarks (issue 16): stratified label subsets, the ablation sweeps and the
label-efficiency run, end to end on tiny models and a handful of images. No accuracy is asserted: these
check that the subsets are exact and seeded and that the programs produce their JSON, tables and figures."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.data.subsets import dataset_labels, labelled_subset, per_class_counts, stratified_indices

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_num_heads": 2,
        "decoder_depth": 1}  # fmt: skip


def _module(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _fashion_mnist_present() -> bool:
    from mimkit.data.fashion_mnist import DEBIAN_DIR, _find_split

    return _find_split(DEBIAN_DIR, "train") is not None and _find_split(DEBIAN_DIR, "test") is not None


needs_fmnist = pytest.mark.skipif(
    not _fashion_mnist_present(), reason="Fashion-MNIST IDX files not installed"
)


@pytest.fixture
def idx_read_once(monkeypatch):
    """Decompress each Fashion-MNIST file once per test: every probe builds its datasets again, and
    gunzipping 60,000 images is most of a tiny run's time."""
    import functools

    import mimkit.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "read_idx", functools.lru_cache(maxsize=None)(fm.read_idx))


# ------------------------------------------------------------------------------------- subsets


def _unbalanced_labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [600, 300, 120, 55, 7])  # unbalanced on purpose
    return labels[rng.permutation(len(labels))]


def test_stratified_fraction_is_exact_per_class():
    labels = _unbalanced_labels()
    idx = stratified_indices(labels, fraction=0.1, seed=3)
    assert idx == sorted(set(idx)) and all(0 <= i < len(labels) for i in idx)
    got = np.bincount(labels[idx], minlength=5).tolist()
    assert got == [60, 30, 12, 6, 1]  # round(0.1 * n) per class (5.5 -> 6, 0.7 -> 1)
    assert per_class_counts(labels, fraction=0.1) == dict(enumerate(got))


def test_stratified_per_class_caps_at_class_size():
    labels = _unbalanced_labels()
    idx = stratified_indices(labels, per_class=10, seed=0)
    assert np.bincount(labels[idx], minlength=5).tolist() == [10, 10, 10, 10, 7]


def test_stratified_is_seeded():
    labels = _unbalanced_labels()
    a, b = (
        stratified_indices(labels, fraction=0.05, seed=1),
        stratified_indices(labels, fraction=0.05, seed=1),
    )
    c = stratified_indices(labels, fraction=0.05, seed=2)
    assert a == b
    assert a != c
    assert np.bincount(labels[a]).tolist() == np.bincount(labels[c]).tolist()  # same counts, other images


def test_stratified_full_fraction_and_bad_arguments():
    labels = _unbalanced_labels()
    assert stratified_indices(labels, fraction=1.0, seed=5) == list(range(len(labels)))
    with pytest.raises(ValueError):
        stratified_indices(labels, fraction=0.0)
    with pytest.raises(ValueError):
        stratified_indices(labels, fraction=0.1, per_class=3)
    with pytest.raises(ValueError):
        stratified_indices(labels)


def test_labelled_subset_of_a_dataset_without_label_array():
    class Items(torch.utils.data.Dataset):  # labels only through the items
        def __len__(self):
            return 40

        def __getitem__(self, i):
            return torch.zeros(1), i % 4

    ds = Items()
    assert dataset_labels(ds).tolist() == [i % 4 for i in range(40)]
    sub = labelled_subset(ds, per_class=3, seed=0)
    assert len(sub) == 12
    assert sorted(np.bincount([sub[i][1] for i in range(len(sub))]).tolist()) == [3, 3, 3, 3]
    assert dataset_labels(sub).tolist() == [sub[i][1] for i in range(len(sub))]


@needs_fmnist
def test_fashion_mnist_one_percent_is_sixty_per_class():
    from mimkit.data.fashion_mnist import FashionMNIST

    labels = dataset_labels(FashionMNIST(split="train"))
    idx = stratified_indices(labels, fraction=0.01, seed=0)
    assert len(idx) == 600 and set(np.bincount(labels[idx]).tolist()) == {60}


# ------------------------------------------------------------------------------------- ablations


def test_ablation_points_are_shared_between_sweeps():
    abl = _module("ablations")
    mae = abl.MAE
    recipe = abl.point_id(mae, {})
    # the recipe (mask 0.75, norm-pix on, decoder depth 2, random masking) is every MAE sweep's baseline
    for overrides in (
        {"mask_ratio": 0.75},
        {"norm_pix_loss": True},
        {"decoder_depth": 2},
        {"mask_kind": "random"},
    ):
        assert abl.point_id(mae, overrides) == recipe
    assert abl.point_id(mae, {"mask_ratio": 0.9}) != recipe
    assert abl.point_id(abl.CAE, {"align_weight": 0.0}) != abl.point_id(abl.CAE, {})
    ids = {abl.point_id(s.model, o) for s in abl.SWEEPS.values() for _, o in s.points}
    total = sum(len(s.points) for s in abl.SWEEPS.values())
    assert len(ids) < total  # shared points are pretrained once


@needs_fmnist
def test_ablation_sweep_of_two_tiny_points_end_to_end(tmp_path, idx_read_once):
    abl = _module("ablations")
    out = tmp_path / "abl"
    argv = ["--steps", "2", "--batch-size", "8", "--sweeps", "mae_norm_pix", "--extra", json.dumps(TINY),
            "--max-train", "40", "--max-test", "20", "--linear-epochs", "1", "--attentive-epochs", "1",
            "--out", str(out)]  # fmt: skip
    assert abl.main(argv) == 0
    res = json.loads((out / "ablations.json").read_text())
    assert res["settings"]["command"].startswith("python benchmarks/ablations.py --steps 2")
    sweep = res["sweeps"]["mae_norm_pix"]
    assert [r["label"] for r in sweep["results"]] == ["norm-pix on", "norm-pix off"]
    assert sweep["paper"] and sweep["baseline"] == "norm-pix on"
    ids = [r["point"] for r in sweep["results"]]
    assert len(set(ids)) == 2 and set(ids) == set(res["points"])
    for pid in ids:
        point = res["points"][pid]
        assert point["pretrain"]["steps"] == 2
        assert point["overrides"]["embed_dim"] == 32
        assert set(abl.PROTOCOLS) <= set(point["probes"])
        assert all(0.0 <= point["probes"][k] <= 1.0 for k in abl.PROTOCOLS)
    assert [res["points"][i]["overrides"]["norm_pix_loss"] for i in ids] == [True, False]
    assert (out / "ablation_mae_norm_pix.png").stat().st_size > 0
    assert "norm-pix off" in (out / "ablations.md").read_text()


# ------------------------------------------------------------------------------------- label efficiency


@needs_fmnist
def test_label_efficiency_tiny_run_end_to_end(tmp_path, idx_read_once):
    le = _module("label_efficiency")
    out = tmp_path / "le"
    argv = ["--models", "mae_vit_tiny_patch4_32", "--steps", "2", "--model-overrides", json.dumps(TINY),
            "--data", "synthetic", "--max-train", "100", "--max-test", "20", "--fractions", "0.2", "1",
            "--seeds", "0", "1", "--seeds-at", "1:1", "--random-init-up-to", "0.2", "--ft-steps", "0.2:1,1:1", "--ft-batch", "8",
            "--linear-epochs", "1", "--attentive-epochs", "1", "--cnn", "resnet10t", "--out", str(out)]  # fmt: skip
    assert le.main(argv) == 0
    res = json.loads((out / "label_efficiency.json").read_text())
    assert res["num_labels"] == {"0.2": 20, "1": 100}  # 2 of each synthetic class's 10 images, then all
    sr = res["settings_results"]
    expected = {"MAE fine-tune", "MAE random-init fine-tune", "MAE linear", "MAE attentive", "MAE kNN",
                "raw pixels: logistic regression", "raw pixels: kNN", "CNN resnet10t (supervised, random init)"}  # fmt: skip
    assert expected <= set(sr)
    for setting in expected:
        assert sr[setting]["0.2"]["seeds"] == 2
        assert 0.0 <= sr[setting]["0.2"]["mean"] <= 1.0 and sr[setting]["0.2"]["std"] >= 0.0
        # random-init fine-tuning only up to --random-init-up-to (default 10%)
        assert ("1" in sr[setting]) == (setting != "MAE random-init fine-tune"), setting
        assert "1" not in sr[setting] or sr[setting]["1"]["seeds"] == 1
    assert sr["MAE fine-tune"]["0.2"]["runs"]["0"]["steps"] >= 1
    assert (out / "label_efficiency.png").stat().st_size > 0
    assert "MAE fine-tune" in (out / "label_efficiency.md").read_text()


def test_label_efficiency_merges_runs_split_by_fraction():
    le = _module("label_efficiency")

    def report(fraction: float, labels: int, accuracy: float) -> dict:
        key = f"{fraction:g}"
        entry = {"num_labels": labels, "runs": {"0": {"accuracy": accuracy}}, "mean": accuracy, "std": 0.0}
        return {
            "settings": {"fractions": [fraction], "command": f"python le.py --fractions {fraction}"},
            "num_labels": {key: labels},
            "encoders": {"mae": {}},
            "cpu_seconds_this_invocation": 10.0,
            "settings_results": {"MAE fine-tune": {key: {**entry, "seeds": 1}}},
        }

    other_seed = report(0.01, 600, 0.8)
    other_seed["settings_results"]["MAE fine-tune"]["0.01"]["runs"] = {"1": {"accuracy": 0.8}}
    merged = le.merge_reports([report(0.01, 600, 0.7), report(1.0, 60000, 0.9), other_seed])
    assert merged["settings"]["fractions"] == [0.01, 1.0] and len(merged["settings"]["commands"]) == 3
    assert merged["num_labels"] == {"0.01": 600, "1": 60000}
    per_fraction = merged["settings_results"]["MAE fine-tune"]
    assert set(per_fraction["0.01"]["runs"]) == {"0", "1"} and per_fraction["0.01"]["seeds"] == 2
    assert per_fraction["0.01"]["mean"] == pytest.approx(0.75) and per_fraction["1"]["mean"] == 0.9
    assert "| MAE fine-tune | 75.0 ± 7.1 (n=2) | 90.0 (n=1) |" in le.table(merged)


def test_attentive_probe_epochs_shrink_where_labels_are_many():
    le = _module("label_efficiency")
    args = le.parse_args([])
    assert [le.attentive_epochs(n, args) for n in (600, 6000, 60000)] == [20, 20, 2]
    args = le.parse_args(["--attentive-epochs", "10", "--attentive-samples", "30000"])
    assert [le.attentive_epochs(n, args) for n in (600, 6000, 60000)] == [10, 5, 1]


def test_per_method_fine_tuning_settings_replace_the_shared_ones():
    le = _module("label_efficiency")
    args = le.parse_args(["--model-ft", '{"cae_vit_tiny_patch4_32": {"crop_min": 1.0, "layer_decay": 0.9}}'])
    shared = le.finetune_config(300, 600, args, 0, random_init=False, model="mae_vit_tiny_patch4_32")
    cae = le.finetune_config(300, 600, args, 0, random_init=False, model="cae_vit_tiny_patch4_32")
    cae_random = le.finetune_config(300, 600, args, 0, random_init=True, model="cae_vit_tiny_patch4_32")
    assert (shared.crop_scale, shared.layer_decay) == ((0.6, 1.0), 0.75)
    assert (cae.crop_scale, cae.layer_decay, cae.base_lr) == ((1.0, 1.0), 0.9, shared.base_lr)
    # the random init gets the method's crops (a fair baseline) and, as every random init, no layer decay
    assert (cae_random.crop_scale, cae_random.layer_decay) == ((1.0, 1.0), 1.0)
    plain = le.finetune_config(
        300, 600, le.parse_args(["--model-ft", "{}"]), 0, False, model="cae_vit_tiny_patch4_32"
    )
    assert plain.crop_scale == shared.crop_scale


def test_per_method_fine_tuning_settings_reject_unknown_keys(capsys):
    le = _module("label_efficiency")
    with pytest.raises(SystemExit):
        le.parse_args(["--model-ft", '{"cae_vit_tiny_patch4_32": {"crop": 1.0}}'])
    assert "--model-ft: cae_vit_tiny_patch4_32 has ['crop']; allowed keys are" in capsys.readouterr().err


STUB_PYTHON = r"""#!/usr/bin/env python3
# Stands in for python in benchmarks/evidence.sh: records each call, writes what the real program would.
import json, os, sys, time
from pathlib import Path
script, argv = Path(sys.argv[1]).name, sys.argv[2:]
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps([script, argv]) + "\n")
out = Path(argv[argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
if script == "ablations.py":
    time.sleep(1)  # process 1 has pretrained by then (a stub takes no time)
elif "--merge" not in argv and "--checkpoints" not in argv:
    if os.environ.get("FAIL_FIRST"):
        sys.exit(3)
    for name in ("mae_vit_tiny_patch4_32", "cae_vit_tiny_patch4_32", "convmae_tiny_patch8_64"):
        (out / "pretrain" / name).mkdir(parents=True)
        (out / "pretrain" / name / "checkpoint.pt").write_bytes(b"")
        (out / "pretrain" / name / "facts.json").write_text("{}")
(out / script.replace(".py", ".json")).write_text(json.dumps(argv))
"""


def _run_evidence(tmp_path, **env):
    import os
    import subprocess

    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    proc = subprocess.run(
        ["bash", str(BENCH / "evidence.sh"), str(tmp_path / "ev")],
        env={**os.environ, "PYTHON": str(stub), "CALLS": str(calls), **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = calls.read_text().splitlines() if calls.is_file() else []
    return proc, [json.loads(line) for line in lines]


def test_evidence_script_splits_the_work_in_two_and_merges(tmp_path):
    proc, calls = _run_evidence(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ev = tmp_path / "ev"
    le = [argv for script, argv in calls if script == "label_efficiency.py"]
    first = next(a for a in le if "--checkpoints" not in a and "--merge" not in a)
    second = next(a for a in le if "--checkpoints" in a)
    merge = next(a for a in le if "--merge" in a)
    # each fraction once: 1% and 10% in the first process, 100% in the second; cae_masking left out
    assert first[first.index("--fractions") + 1 : first.index("--random-init-up-to")] == ["0.01", "0.1"]
    assert second[second.index("--fractions") + 1 : second.index("--resume")] == ["1.0"]
    sweeps = next(a for script, a in calls if script == "ablations.py")
    assert "mae_partial_ft" in sweeps and "cae_target" in sweeps and "cae_masking" not in sweeps
    # the second process fine-tunes the encoders the first one pretrained; the report merges both
    given = second[second.index("--checkpoints") + 1 : second.index("--fractions")]
    assert given == [f"{m}={ev}/le_1/pretrain/{m}/checkpoint.pt"
                     for m in ("mae_vit_tiny_patch4_32", "cae_vit_tiny_patch4_32", "convmae_tiny_patch8_64")]  # fmt: skip
    assert merge[merge.index("--merge") + 1 : merge.index("--out")] == [
        f"{ev}/le_1/label_efficiency.json", f"{ev}/le_2/label_efficiency.json"
    ]  # fmt: skip
    assert calls[-1][1] == merge  # merged last, after both processes


def test_evidence_script_stops_when_pretraining_fails(tmp_path):
    proc, calls = _run_evidence(tmp_path, FAIL_FIRST="1")
    assert proc.returncode != 0
    assert "process 1 stopped before" in proc.stdout and "le_1.log" in proc.stdout
    assert not any("--checkpoints" in argv or "--merge" in argv for _, argv in calls)
