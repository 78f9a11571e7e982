"""What the activation recomputation of `mimkit.layers.recompute` costs in train-step time.

    python benchmarks/recompute_cost.py --model mae_vit_tiny_patch4_32 --batch-size 256 --dtype bf16 --threads 1

One process, one model; rounds alternate (ABBA) between the recomputing functions (layer norm, GELU and
attention probabilities recomputed in backward) and plain autograd through the same ops (they stored).
Prints JSON: median img/s of each and the ratio plain / recompute (> 1: recomputation costs that much).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import mimkit.layers.attention as attention
import mimkit.layers.mlp as mlp
import mimkit.layers.recompute as recompute
from mimkit.commands.bench import _Runner

RECOMPUTING = (recompute.norm_linear, recompute.gelu_linear, recompute.softmax_attention)
PLAIN = (
    lambda x, norm, weight, bias: F.linear(norm(x), weight, bias),
    lambda h, linear: linear(F.gelu(h)),
    lambda q, k, v: recompute.attention_probabilities(q, k) @ v,
)


def use(functions) -> None:
    norm_linear, gelu_linear, softmax_attention = functions
    attention.norm_linear = mlp.norm_linear = norm_linear
    mlp.gelu_linear = gelu_linear
    attention.softmax_attention = softmax_attention


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
    runner = _Runner("mimkit", args.model, args.batch_size, args.dtype)
    variants = {"recompute": RECOMPUTING, "plain": PLAIN}
    step_s = {name: [] for name in variants}
    for functions in variants.values():  # warm-up
        use(functions)
        runner.step()
    for r in range(args.rounds):
        for name in variants if r % 2 == 0 else reversed(variants):
            use(variants[name])
            step_s[name].append(statistics.median(runner.step() for _ in range(args.steps)))
    use(RECOMPUTING)
    ips = {name: args.batch_size / statistics.median(s) for name, s in step_s.items()}
    print(
        json.dumps({**vars(args), "img_per_s": ips, "plain_over_recompute": ips["plain"] / ips["recompute"]})
    )


if __name__ == "__main__":
    main()
