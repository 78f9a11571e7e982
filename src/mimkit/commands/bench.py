"""`mimkit bench`: train-step throughput of mimkit MAE against Hugging Face ViTMAE, alternating, as JSON.

Each measurement (one implementation, one config, one round) runs in a fresh subprocess, so its peak
memory is an honest resident-set high-water mark (`ru_maxrss`) of that run alone: model, AdamW state,
activations and autograd buffers. The subprocess also records its RSS just before building the model
(interpreter + torch + transformers imported, identical for both sides); `peak_rss_delta_mb` is the
difference, the memory the training step itself needed. Rounds alternate the order (mimkit, peer, peer,
mimkit, ...) so slow drifts of a shared machine hit both sides alike; the report gives medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

# name -> (mimkit preset, batch size)
CONFIGS: dict[str, tuple[str, int]] = {
    "vit_b16_bs16": ("mae_vit_base_patch16_224", 16),
    "tiny_bs256": ("mae_vit_tiny_patch4_32", 256),
}
DTYPES = ("fp32", "bf16")
IMPLS = ("mimkit", "peer")


def hf_config(mimkit_config: Any):
    """A Hugging Face `ViTMAEConfig` equivalent to a mimkit `MAEConfig` (eps, mask ratio, norm-pix)."""
    from transformers import ViTMAEConfig

    from ..layers.patch_embed import to_2tuple

    c = mimkit_config
    h, w = to_2tuple(c.img_size)
    if h != w:
        raise ValueError("the Hugging Face peer supports square images only")
    return ViTMAEConfig(
        image_size=h,
        patch_size=c.patch_size,
        num_channels=c.in_chans,
        hidden_size=c.embed_dim,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        intermediate_size=int(c.embed_dim * c.mlp_ratio),
        decoder_hidden_size=c.decoder_embed_dim,
        decoder_num_hidden_layers=c.decoder_depth,
        decoder_num_attention_heads=c.decoder_num_heads,
        decoder_intermediate_size=int(c.decoder_embed_dim * c.mlp_ratio),
        mask_ratio=c.mask_ratio,
        norm_pix_loss=c.norm_pix_loss,
        layer_norm_eps=c.norm_eps,
        hidden_act="gelu",
        qkv_bias=True,
        attn_implementation="sdpa",
    )


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(
    impl: str, model_name: str, batch_size: int, dtype: str, warmup: int, steps: int, threads: int = 0
) -> dict:
    """Build one model and time `steps` AdamW train steps after `warmup`; returns a JSON-able dict."""
    if threads:
        torch.set_num_threads(threads)
    import transformers  # noqa: F401  (imported on both sides so the RSS baselines match)

    import mimkit

    from ..engine.perf import model_flops_per_image

    torch.manual_seed(0)
    baseline_rss = _rss_mb()
    model = mimkit.create_model(model_name)
    flops = model_flops_per_image(model)
    config = model.config
    if impl == "peer":
        from transformers import ViTMAEForPreTraining

        model = ViTMAEForPreTraining(hf_config(config))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    h = w = config.img_size if isinstance(config.img_size, int) else config.img_size[0]
    images = torch.randn(batch_size, config.in_chans, h, w)
    use_bf16 = dtype == "bf16"

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(images).loss if impl == "mimkit" else model(pixel_values=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{impl} produced a non-finite loss")
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = statistics.median(times)
    return {
        "impl": impl,
        "step_s": times,
        "img_per_s": batch_size / median,
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": baseline_rss,
        "peak_rss_delta_mb": peak_mb - baseline_rss,
        "flops_per_image": flops,
        "threads": torch.get_num_threads(),
    }


def _spawn(
    impl: str, model_name: str, batch_size: int, dtype: str, warmup: int, steps: int, threads: int
) -> dict:
    worker = ["--worker", impl, model_name, str(batch_size), dtype, str(warmup), str(steps), str(threads)]
    cmd = [sys.executable, "-m", "mimkit.commands.bench", *worker]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"benchmark worker failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(
    configs: list[str],
    dtypes: list[str],
    rounds: int = 3,
    warmup: int = 1,
    steps: int = 3,
    progress=None,
    threads: int = 0,
) -> dict:
    """Alternate mimkit and the peer over `rounds` for every config x dtype; medians, ratios and MFU."""
    from ..engine.perf import measure_matmul_ceiling

    if threads:
        torch.set_num_threads(threads)
    ceiling = {
        "fp32": measure_matmul_ceiling(torch.float32),
        "bf16": measure_matmul_ceiling(torch.bfloat16),
    }
    report: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "matmul_ceiling_gflops": {k: v / 1e9 for k, v in ceiling.items()},
        "settings": {"rounds": rounds, "warmup": warmup, "steps": steps},
        "results": {},
    }
    for name in configs:
        model_name, batch_size = CONFIGS[name]
        for dtype in dtypes:
            runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
            for r in range(rounds):
                order = IMPLS if r % 2 == 0 else IMPLS[::-1]
                for impl in order:
                    res = _spawn(impl, model_name, batch_size, dtype, warmup, steps, threads)
                    runs[impl].append(res)
                    if progress:
                        progress(f"{name} {dtype} round {r}: {impl} {res['img_per_s']:.2f} img/s")
            flops = runs["mimkit"][0]["flops_per_image"]
            entry: dict[str, Any] = {"model": model_name, "batch_size": batch_size, "flops_per_image": flops}
            for impl in IMPLS:
                ips = [x["img_per_s"] for x in runs[impl]]
                med = statistics.median(ips)
                entry[impl] = {
                    "img_per_s": med,
                    "img_per_s_rounds": ips,
                    "pct_of_ceiling": 100 * med * flops / ceiling[dtype],
                    "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in runs[impl]),
                    "peak_rss_delta_mb": statistics.median(x["peak_rss_delta_mb"] for x in runs[impl]),
                }
            per_round = [m["img_per_s"] / p["img_per_s"] for m, p in zip(runs["mimkit"], runs["peer"])]
            entry["speed_ratio"] = entry["mimkit"]["img_per_s"] / entry["peer"]["img_per_s"]
            entry["speed_ratio_rounds"] = per_round
            entry["memory_ratio"] = entry["mimkit"]["peak_rss_delta_mb"] / entry["peer"]["peak_rss_delta_mb"]
            report["results"][f"{name}_{dtype}"] = entry
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["matmul_ceiling_gflops_end"] = {
        "fp32": measure_matmul_ceiling(torch.float32) / 1e9,
        "bf16": measure_matmul_ceiling(torch.bfloat16) / 1e9,
    }
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per config (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (median step time)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    report = run_benchmark(
        args.configs, args.dtypes, args.rounds, args.warmup, args.steps, progress, args.threads
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="train-step throughput of mimkit MAE vs Hugging Face ViTMAE (JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


if __name__ == "__main__":
    if len(sys.argv) == 9 and sys.argv[1] == "--worker":
        impl, model_name, bs, dtype, warmup, steps, threads = sys.argv[2:]
        print(json.dumps(run_worker(impl, model_name, int(bs), dtype, int(warmup), int(steps), int(threads))))
    else:
        parser = argparse.ArgumentParser(prog="python -m mimkit.commands.bench")
        add_arguments(parser)
        sys.exit(run(parser.parse_args()))
