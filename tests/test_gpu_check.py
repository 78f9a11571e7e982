"""benchmarks/gpu_check.py proves itself on the CPU: its dry run (tiny models, a few steps) gives the JSON
the GPU run will give, with finite, small parity numbers, the trainer's real step, the peer (when
transformers is installed) and a 2-rank DDP step over gloo."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # stdout is the JSON alone (log lines go to stderr)
    assert printed == json.loads(out.read_text())
    return printed


def test_schema_and_machine(report):
    assert report["schema"] == "mimkit.gpu_check/1" and report["dry_run"] is True
    assert {
        "machine",
        "ceiling",
        "parity",
        "parity_pass",
        "train",
        "loader",
        "ddp",
        "anchors",
        "wall_s",
    } <= set(report)
    cpu = report["machine"]["cpu"]
    assert cpu["model_name"] and {"avx512_bf16", "amx_bf16"} <= set(cpu["flags"])
    assert all(isinstance(present, bool) for present in cpu["flags"].values())
    assert cpu["amx"] == cpu["flags"]["amx_bf16"]  # read off lscpu on whichever machine runs this
    assert report["ceiling"]["used"] > 0 and math.isfinite(report["ceiling"]["used"])


def test_parity_is_finite_and_small_for_every_method(report):
    assert set(report["parity"]) == {"mae", "cae", "convmae"}
    for method, entry in report["parity"].items():
        assert "error" not in entry, (method, entry.get("error"))
        for key in ("loss_rel_diff", "grad_max_rel_diff", "grad_max_abs_diff_over_max_grad"):
            assert math.isfinite(entry[key]) and 0 <= entry[key] <= 1e-4, (method, key, entry[key])
        assert math.isfinite(entry["loss_cpu"]) and entry["params_with_grad"] > 10
        assert entry["grad_set_mismatch"] == [] and entry["pass"] is True
    assert report["parity_pass"] is True


def test_train_steps_run_through_the_trainer(report):
    eager = report["train"]["eager"]
    for method in ("mae", "cae", "convmae"):
        entry = eager[method]
        assert "error" not in entry, (method, entry.get("error"), entry.get("traceback"))
        assert entry["img_per_s"] > 0 and len(entry["img_per_s_rounds"]) == 2
        assert 0 < entry["mfu_vs_peak"] and math.isfinite(entry["mfu_vs_measured_matmul"])
        assert entry["flops_per_image"] > 0
        wiring = entry["wiring"]
        assert wiring["param_device"] == "cpu" and wiring["fused_adamw"] is True and not wiring["compiled"]
    if importlib.util.find_spec("transformers") is None:
        assert "transformers" in eager["peer"]["skipped"]
    else:
        assert eager["peer"]["img_per_s"] > 0 and eager["mae_vs_peer_speed"] > 0
    assert "skipped" in report["train"]["compile"]


@pytest.mark.distributed
def test_loader_and_ddp(report):
    assert report["loader"]["img_per_s"] > 0
    ddp = report["ddp"]
    assert "error" not in ddp and "skipped" not in ddp, ddp
    assert ddp["backend"] == "gloo", ddp
    for method in ("mae", "cae", "convmae"):  # the trainer's own DDP wrapping, every method
        assert "error" not in ddp[method], (
            method,
            ddp[method],
            [r["methods"].get(method) for r in ddp["ranks"]],
        )
        assert all(r["methods"][method]["ddp_wrapped"] for r in ddp["ranks"])
        assert ddp[method]["weights_identical_across_ranks"] is True and ddp[method]["img_per_s_total"] > 0
    assert "error" not in ddp["mae_fsdp"], [r["methods"].get("mae_fsdp") for r in ddp["ranks"]]
    assert all(r["methods"]["mae_fsdp"]["fsdp_sharded"] for r in ddp["ranks"])
    assert ddp["mae_fsdp"]["weights_identical_across_ranks"] is True


def test_device_peak_table():
    module = _load_script()
    assert module.table_peak("NVIDIA H100 80GB HBM3") == ("H100", 989e12)
    assert module.table_peak("NVIDIA H100 PCIe")[1] == 756e12
    assert module.table_peak("NVIDIA H200")[1] == 989e12
    assert module.table_peak("NVIDIA A100-SXM4-80GB")[1] == 312e12
    assert module.table_peak("NVIDIA L40S")[1] == 362e12 and module.table_peak("NVIDIA L4")[1] == 121e12
    assert module.table_peak("Some Future GPU") == (None, None)


def test_regional_compile_runner_is_wired(tmp_path):
    # The compiled phase (skipped in the dry run: compiling takes a minute on a CPU) builds MAE with only its
    # blocks compiled; building it is cheap (compilation happens at the first step), so check the wiring here.
    import torch

    from mimkit.layers import Block

    module = _load_script()
    runner = module.TrainerRunner(
        "mae", True, 4, torch.device("cpu"), False, str(tmp_path), 1e11, regional=True
    )
    try:
        model = runner.trainer.model
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
        assert runner.wiring["compiled"] == "blocks" and runner.trainer.train_model is model
    finally:
        runner.close()


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
