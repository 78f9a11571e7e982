"""What selective activation checkpointing (`mimkit.layers.set_selective_checkpointing`) costs and saves.

    python benchmarks/recompute_cost.py --model mae_vit_tiny_patch4_32 --batch-size 256 --dtype bf16 --threads 1

One process, one model; rounds alternate (ABBA) between the plain blocks (autograd stores what it needs) and
selective checkpointing (each block keeps only its matmul/attention outputs and recomputes layer norms, GELU,
softmax and casts in backward). Prints JSON: median img/s of each, the ratio plain / selective (> 1: the
recomputation costs that much), and the bytes saved for backward by one training forward of each.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from mimkit.commands.bench import StepRunner, machine_record
from mimkit.layers import set_selective_checkpointing


def saved_bytes(runner: StepRunner) -> int:
    """Bytes autograd keeps for backward during one training forward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=runner.bf16):
            loss = runner.model(runner.images).loss
    loss.backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_tiny_patch4_32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = StepRunner("mimkit", args.model, args.batch_size, args.dtype)
    variants = {"plain": False, "selective": True}
    step_s: dict[str, list[float]] = {name: [] for name in variants}
    stored = {}
    for name, enabled in variants.items():  # warm-up, and what each keeps for backward
        set_selective_checkpointing(runner.model, enabled)
        runner.step()
        stored[name] = saved_bytes(runner)
    for r in range(args.rounds):
        for name in variants if r % 2 == 0 else reversed(variants):
            set_selective_checkpointing(runner.model, variants[name])
            step_s[name].append(statistics.median(runner.step() for _ in range(args.steps)))
    ips = {name: args.batch_size / statistics.median(s) for name, s in step_s.items()}
    result = {
        **vars(args),
        "img_per_s": ips,
        "plain_over_selective": ips["plain"] / ips["selective"],
        "saved_for_backward_mib": {k: v / 2**20 for k, v in stored.items()},
        "selective_over_plain_memory": stored["selective"] / stored["plain"],
        "machine": machine_record(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
