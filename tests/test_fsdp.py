"""FSDP2 on 2 CPU processes (gloo) trains to DDP's weights; its checkpoints load in plain runs and back."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import mimkit
from mimkit.engine.fsdp import apply_activation_checkpointing, blocks_of

SMALL = dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from torch import nn
    import mimkit
    from mimkit.engine.fsdp import (shard_model, full_model_state_dict, full_optimizer_state_dict,
                                    load_full_model_state_dict, load_full_optimizer_state_dict, is_sharded)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = SMALL
    make = lambda: mimkit.create_model("mae_vit_tiny_patch4_32", **cfg)
    torch.manual_seed(0)
    plain = make()
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    ddp = nn.parallel.DistributedDataParallel(plain)
    # Rank 1 initialises differently (as under per-rank seeds); sharding starts from rank 0's weights.
    torch.manual_seed(0 if rank == 0 else 123)
    fsdp = make()
    shard_model(fsdp, activation_checkpointing=True)
    assert is_sharded(fsdp)
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    opt_d, opt_f = adamw(ddp.parameters()), adamw(fsdp.parameters())

    def batch(step):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
        return torch.randn(4, 3, 32, 32, generator=g), plain.mask_generator(4, g)

    def train(model, opt, steps):
        for step in steps:
            images, mask = batch(step)
            model(images, mask).loss.backward()
            opt.step()
            opt.zero_grad()

    train(ddp, opt_d, range(3))
    train(fsdp, opt_f, range(3))
    full = full_model_state_dict(fsdp)
    optim = full_optimizer_state_dict(fsdp, opt_f)
    result = {}
    if rank == 0:
        ref = plain.state_dict()
        assert set(full) == set(ref)
        result["max_diff_fsdp_vs_ddp"] = max((full[k] - ref[k]).abs().max().item() for k in ref)
        result["max_update"] = max((ref[k] - start[k]).abs().max().item() for k in ref)
        # FSDP's optimizer state is a plain optimizer.state_dict(): it loads into a single-process run.
        single = make()
        single.load_state_dict(full)
        opt_s = adamw(single.parameters())
        opt_s.load_state_dict(optim)
        ref_state = opt_d.state_dict()["state"]
        result["max_diff_exp_avg_sq"] = max(
            (opt_s.state_dict()["state"][i]["exp_avg_sq"] - s["exp_avg_sq"]).abs().max().item()
            for i, s in ref_state.items()
        )
    # And back: DDP's (single-process layout) weights and optimizer state load into a fresh FSDP model,
    # which then continues in step with DDP.
    again = make()
    shard_model(again)
    opt_a = adamw(again.parameters())
    load_full_model_state_dict(again, plain.state_dict())
    load_full_optimizer_state_dict(again, opt_a, opt_d.state_dict())
    train(ddp, opt_d, range(3, 5))
    train(again, opt_a, range(3, 5))
    full = full_model_state_dict(again)
    if rank == 0:
        ref = plain.state_dict()
        result["max_diff_resumed"] = max((full[k] - ref[k]).abs().max().item() for k in ref)
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_ddp_and_checkpoints_cross_over(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(f"SMALL = {SMALL!r}\n" + WORKER)
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(out),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["max_update"] > 1e-3  # the weights really moved
    assert result["max_diff_fsdp_vs_ddp"] < 1e-5, result
    assert result["max_diff_exp_avg_sq"] < 1e-8, result
    assert result["max_diff_resumed"] < 1e-5, result


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_activation_checkpointing_keeps_names_and_gradients():
    model = mimkit.create_model("mae_vit_tiny_patch4_32", **SMALL)
    twin = mimkit.create_model("mae_vit_tiny_patch4_32", **SMALL)
    twin.load_state_dict(model.state_dict())
    apply_activation_checkpointing(twin)
    assert len(blocks_of(twin)) == SMALL["depth"] + SMALL["decoder_depth"]
    assert list(twin.state_dict()) == list(model.state_dict())
    images, mask = torch.randn(2, 3, 32, 32), model.mask_generator(2)
    model(images, mask).loss.backward()
    twin(images, mask).loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=name)
