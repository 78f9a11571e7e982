"""bf16 attention on CPU, forward + backward: SDPA against the batched-matmul forms of `mimkit.layers`.

    python benchmarks/attention_kernels.py

Shapes [B, heads, N, d] of ViT-B/16 MAE at batch 16 (encoder on 49 visible + class token, decoder on all
197 tokens) and of the tiny preset at batch 256. Prints the median milliseconds per call for each thread
count: `sdpa` (F.scaled_dot_product_attention) and `bmm` (what mimkit trains with in bf16 on CPU: two batched
matmuls and a softmax under plain autograd, `mimkit.layers.attend`).
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from mimkit.commands.bench import machine_record
from mimkit.layers.attention import attention_probabilities

SHAPES = {
    "vit_b_encoder": (16, 12, 50, 64),
    "vit_b_decoder": (16, 16, 197, 32),
    "tiny_encoder": (256, 3, 17, 64),
    "tiny_decoder": (256, 4, 65, 32),
}
KERNELS = {
    "sdpa": F.scaled_dot_product_attention,
    "bmm": lambda q, k, v: attention_probabilities(q, k) @ v,
}


def time_ms(fn, shape, calls: int = 10) -> float:
    q, k, v = (torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, dtype=torch.bfloat16)
    times = []
    for _ in range(calls + 2):
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])  # the first two calls warm up


def main() -> None:
    torch.manual_seed(0)
    report = {}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for name, shape in SHAPES.items():
            report[f"{name}_threads{threads}"] = {
                k: round(time_ms(fn, shape), 2) for k, fn in KERNELS.items()
            }
    report["machine"] = machine_record()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
