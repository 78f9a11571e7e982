"""Profile train steps (forward + backward + AdamW) with torch.profiler: where do the milliseconds go?

    python benchmarks/profile_step.py --model mae_vit_base_patch16_224 --batch-size 16 --dtype bf16
    python benchmarks/profile_step.py --impl peer ...        # the Hugging Face ViTMAE peer instead
    python benchmarks/profile_step.py --compile blocks ...   # regionally compiled blocks (compile time stated)

Prints the top operators by self CPU time and a JSON summary splitting each step into matmul time
(linear/conv/bmm/attention kernels) and everything else, per operator.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import mimkit
from mimkit.commands.bench import machine_record

MATMUL_OPS = (
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "aten::matmul",
    "aten::convolution",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::baddbmm",
    "aten::_addmm_activation",
)


CATEGORIES = {  # non-matmul operator families (self CPU time); compiled kernels go to "fused (inductor)"
    "copies and casts": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "layer norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "reductions (bias grads, loss)": ("aten::sum", "aten::mean", "aten::var"),
    "element-wise add/mul": ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::div", "aten::sub"),
    "optimizer": (
        "Optimizer.step#AdamW.step",
        "aten::_fused_adamw_",
        "aten::lerp_",
        "aten::sqrt",
        "aten::addcdiv_",
    ),
    "gather/scatter/index": (
        "aten::index",
        "aten::_index_put_impl_",
        "aten::gather",
        "aten::scatter",
        "aten::where",
    ),
}


def categories(per_op: dict[str, float]) -> dict[str, float]:
    """Self-CPU milliseconds per step by operator family: matmul, the families above, compiled kernels, rest."""
    out = {"matmul": sum(v for k, v in per_op.items() if k in MATMUL_OPS)}
    seen = set(MATMUL_OPS)
    for name, ops in CATEGORIES.items():
        out[name] = sum(per_op.get(op, 0.0) for op in ops)
        seen |= set(ops)
    out["fused (inductor)"] = sum(
        v
        for k, v in per_op.items()
        if k not in seen
        and ("CompiledFxGraph" in k or "cpp_fused" in k or "Torch-Compiled" in k or "CompiledFunction" in k)
    )
    out["other"] = sum(v for k, v in per_op.items() if k not in seen) - out["fused (inductor)"]
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16_224")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--impl", choices=["mimkit", "peer"], default="mimkit")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = default)")
    p.add_argument("--shapes", action="store_true", help="also list copy_ calls grouped by input shape")
    p.add_argument("--adamw", choices=["default", "fused"], default="fused", help="fused: as the trainer")
    p.add_argument("--compile", choices=["none", "blocks"], default="none", help="regional torch.compile")
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mimkit.create_model(args.model)
    c = model.config
    if args.impl == "peer":
        from transformers import ViTMAEForPreTraining

        from mimkit.commands.bench import hf_config

        model = ViTMAEForPreTraining(hf_config(c))
    if args.compile == "blocks":
        from mimkit.commands.bench import compile_transformer_blocks

        compile_transformer_blocks(model)
    kw = {"fused": True} if args.adamw == "fused" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kw)
    size = c.img_size if isinstance(c.img_size, int) else c.img_size[0]
    images = torch.randn(args.batch_size, c.in_chans, size, size)
    bf16 = args.dtype == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(images).loss if args.impl == "mimkit" else model(pixel_values=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # warm-up (with --compile: compiles)
    first_step_s = time.perf_counter() - start
    step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    wall = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.shapes:
        by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::copy_"]
        for e in sorted(by_shape, key=lambda e: -e.self_cpu_time_total)[:20]:
            print(
                f"copy_ {e.count // args.steps:5d}/step {e.self_cpu_time_total / 1000 / args.steps:9.1f} ms  {e.input_shapes}"
            )
    per_op = {e.key: e.self_cpu_time_total / 1000 / args.steps for e in events}
    matmul = sum(v for k, v in per_op.items() if k in MATMUL_OPS)
    other = {k: round(v, 1) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1]) if k not in MATMUL_OPS}
    summary = {
        "model": args.model,
        "impl": args.impl,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "adamw": args.adamw,
        "compile": args.compile,
        "first_step_s": round(first_step_s, 1),
        "step_ms_wall_profiled": round(wall * 1000, 1),
        "self_cpu_ms_total": round(sum(per_op.values()), 1),
        "matmul_ms": round(matmul, 1),
        "non_matmul_ms": round(sum(per_op.values()) - matmul, 1),
        "matmul_share": round(matmul / max(sum(per_op.values()), 1e-9), 3),
        "non_matmul_top": dict(list(other.items())[:15]),
        "categories_ms": categories(per_op),
        "machine": machine_record(),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
