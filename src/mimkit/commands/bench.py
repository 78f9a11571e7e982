"""`mimkit bench`: train-step throughput of mimkit MAE against Hugging Face ViTMAE, alternating, as JSON.

The peer needs `transformers` (a dev extra: `pip install mimkit[dev]`); without it mimkit is benchmarked
alone and the report says so under `peer`. Every report records the machine: the CPU's `lscpu` model line,
family/model and the flags that decide bf16 speed (avx512_bf16, amx), and the measured matmul ceilings in
fp32 and bf16 at 1 and 2 threads (and at the run's thread count), so figures from different machines are
never compared blind. `--recipes configs/*_tiny_fmnist.yaml` also trains each recipe for a few steps through
the real trainer and reports its own img/s and MFU (against the ceiling measured here) and its data
loader's img/s alone.

Speed: for each config x dtype, one fresh subprocess builds both models (same seed, same synthetic batch,
AdamW on both) and alternates them in blocks of `--steps` train steps (forward + backward + optimizer
step) per round, in ABBA order (mimkit, peer, peer, mimkit, ...), so load drifts of a shared machine hit
both alike; the report gives the median over rounds of each round's median step, the ratio of those, and
the median of per-round ratios.

Memory: each implementation then runs alone in its own fresh subprocess (3 steps); its peak memory is the
resident-set high-water mark (`ru_maxrss`): model, AdamW state, activations, autograd buffers. The process
records its RSS before building the model (interpreter + torch + transformers, identical on both sides);
`peak_rss_delta_mb` is the difference, the memory training itself needed, and `memory_ratio` compares it.
glibc keeps freed heap memory mapped, so that high-water mark also counts memory that was free at the peak;
a second pair of runs with `MALLOC_MMAP_THRESHOLD_=131072` (every block of 128 KiB or more mapped on
allocation and unmapped on free) makes it track the tensors alive at once: `peak_live_delta_mb`,
`memory_ratio_live`. That environment variable is also a way for users to lower a CPU run's resident memory.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

# name -> (mimkit preset, batch size)
CONFIGS: dict[str, tuple[str, int]] = {
    "vit_b16_bs16": ("mae_vit_base_patch16_224", 16),
    "tiny_bs256": ("mae_vit_tiny_patch4_32", 256),
}
DTYPES = ("fp32", "bf16")
IMPLS = ("mimkit", "peer")
COMPILED = "_compiled"  # suffix of an implementation run with its blocks compiled (`--compile`)
COMPILE_CHOICES = {"none": (), "mimkit": ("mimkit",), "both": ("mimkit", "peer")}
CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def transformers_missing() -> str | None:
    """Why the Hugging Face peer cannot run here (None when it can)."""
    if os.environ.get("MIMKIT_BENCH_NO_PEER"):
        return "MIMKIT_BENCH_NO_PEER is set (--no-peer); mimkit alone"
    try:
        found = importlib.util.find_spec("transformers") is not None
    except ValueError:  # a stub in sys.modules
        found = False
    if not found:
        return "transformers is not installed (it is a dev extra: pip install 'mimkit[dev]'); mimkit alone"
    return None


def available_impls() -> tuple[str, ...]:
    return IMPLS if transformers_missing() is None else ("mimkit",)


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """The CPU as `lscpu` names it: model line, vendor, family/model, the bf16-relevant flags, core count."""
    fields: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if not fields.get("Flags"):  # no lscpu: the kernel's view of the first CPU
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    name = {"model name": "Model name", "flags": "Flags", "cpu family": "CPU family",
                            "model": "Model", "vendor_id": "Vendor ID"}.get(key.strip())  # fmt: skip
                    if name and name not in fields:
                        fields[name] = value.strip()
        except OSError:
            pass
    flags = set(fields.get("Flags", "").split())
    return {
        "model_name": fields.get("Model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("Vendor ID"),
        "family": fields.get("CPU family"),
        "model": fields.get("Model"),
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
        "amx": any(flag.startswith("amx") for flag in flags),
    }


def matmul_ceilings(thread_counts: tuple[int, ...] = (1, 2)) -> dict[str, dict[str, float]]:
    """Measured 2048^3 matmul GFLOP/s in fp32 and bf16 at each thread count (the thread setting is restored)."""
    from ..engine.perf import measure_matmul_ceiling

    before = torch.get_num_threads()
    out: dict[str, dict[str, float]] = {"fp32": {}, "bf16": {}}
    try:
        for n in sorted(set(thread_counts)):
            torch.set_num_threads(n)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                out[name][str(n)] = measure_matmul_ceiling(dtype) / 1e9
    finally:
        torch.set_num_threads(before)
    return out


def machine_record(ceilings: bool = True) -> dict[str, Any]:
    """What every benchmark JSON records about the machine: the CPU (`cpu_info`), threads, torch, load, and
    (a few seconds) the fp32 / bf16 matmul ceilings at 1 and 2 threads and at the current thread count."""
    record = machine_info()
    if ceilings:
        record["matmul_ceilings_by_threads_gflops"] = matmul_ceilings((1, 2, torch.get_num_threads()))
    return record


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def hf_config(mimkit_config: Any):
    """A Hugging Face `ViTMAEConfig` equivalent to a mimkit `MAEConfig` (eps, mask ratio, norm-pix)."""
    from transformers import ViTMAEConfig

    from ..layers.patch_embed import to_2tuple

    c = mimkit_config
    h, w = to_2tuple(c.img_size)
    if h != w:
        raise ValueError("the Hugging Face peer supports square images only")
    return ViTMAEConfig(  # type: ignore[call-arg]  # transformers 5 takes attn_implementation through its config machinery, not the signature
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


class StepRunner:
    """One implementation's model, optimizer and a fixed synthetic batch; `step()` times one train step."""

    def __init__(
        self,
        impl: str,
        model_name: str,
        batch_size: int,
        dtype: str,
        adamw: str = "default",
        compile: str = "none",
    ):
        import mimkit
        from mimkit.protocols import as_method

        if impl.endswith(COMPILED):  # "mimkit_compiled", "peer_compiled": regional torch.compile
            impl, compile = impl[: -len(COMPILED)], "blocks"
        self.impl, self.batch_size, self.bf16 = impl, batch_size, dtype == "bf16"
        torch.manual_seed(0)
        model = mimkit.create_model(model_name)
        self.config = c = as_method(model).config
        if impl == "peer":
            from transformers import ViTMAEForPreTraining

            model = ViTMAEForPreTraining(hf_config(c))
        elif impl != "mimkit":
            raise ValueError(f"unknown implementation {impl!r}")
        self.model = model.train()
        if compile == "blocks":
            compile_transformer_blocks(model)
        elif compile != "none":
            raise ValueError(f"compile must be 'none' or 'blocks', got {compile!r}")
        kw: dict[str, Any] = {"fused": True} if adamw == "fused" else {}
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **kw)
        size = c.img_size if isinstance(c.img_size, int) else c.img_size[0]
        self.images = torch.randn(batch_size, c.in_chans, size, size)

    def step(self) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if self.impl == "mimkit":
                loss = self.model(self.images).loss
            else:
                loss = self.model(pixel_values=self.images).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.impl} produced a non-finite loss")
        return time.perf_counter() - start


def compile_transformer_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Regional torch.compile of mimkit's blocks (`mimkit.layers.compile_blocks`) or of Hugging Face's
    `ViTMAELayer`s: the same treatment for both sides of the comparison."""
    from ..layers import compile_blocks

    compile_blocks(model)
    for m in model.modules():
        if type(m).__name__ == "ViTMAELayer":
            m.compile()
    return model


def time_worker(
    model_name: str, batch_size: int, dtype: str, rounds: int, warmup: int, steps: int, adamw: str = "default",
    impls: Sequence[str] | None = None, compile: str = "none",
) -> dict:  # fmt: skip
    """Both implementations in one process, alternating in blocks of `steps` steps (ABBA order) per round,
    so machine-load drifts hit both alike. Returns per-round median step times and each one's first step
    (with `compile`, its compile time is the first step less a median step)."""
    impls = tuple(impls or available_impls())
    runners = {impl: StepRunner(impl, model_name, batch_size, dtype, adamw, compile) for impl in impls}
    first: dict[str, float] = {}
    for impl, runner in runners.items():
        compiled = compile != "none" or impl.endswith(COMPILED)
        for i in range(max(warmup, 1 if compiled else 0)):  # a compiled run's first step compiles
            t = runner.step()
            if i == 0:
                first[impl] = t
    step_s: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            step_s[impl].append(statistics.median(runners[impl].step() for _ in range(steps)))
    return {"step_s_rounds": step_s, "first_step_s": first}


def memory_worker(
    model_name: str, batch_size: int, dtype: str, impl: str, adamw: str = "default", compile: str = "none"
) -> dict:
    """Peak RSS of `impl` alone in this fresh process: a warm-up step and two measured steps."""
    if transformers_missing() is None:
        import transformers  # noqa: F401  (imported on both sides so the RSS baselines match)

    import mimkit  # noqa: F401

    baseline = _rss_mb()
    runner = StepRunner(impl, model_name, batch_size, dtype, adamw, compile)
    for _ in range(3):
        runner.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mb": peak, "baseline_rss_mb": baseline, "peak_rss_delta_mb": peak - baseline}


LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: unmap big freed blocks at once


def _spawn(*worker_args: object, threads: int = 0, env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "mimkit.commands.bench", "--worker", json.dumps([threads, *worker_args])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise RuntimeError(f"benchmark worker failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recipe_worker(
    path: str, steps: int, log_every: int, ceiling: float | None, loader_batches: int = 6
) -> dict:
    """Train the recipe at `path` for `steps` steps through the real trainer (a temporary output folder);
    the trainer's own img/s and MFU per log window, the first window (start-up) dropped, and its data loader
    alone over `loader_batches` batches before training."""
    from ..engine.config import load_config
    from ..engine.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="mimkit_bench_") as out:
        overrides = [
            f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.output_dir={out}",
            "train.progress=false", f"train.ckpt_every={10 * steps}",
        ]  # fmt: skip
        if ceiling:
            overrides.append(f"train.matmul_ceiling={ceiling}")
        cfg = load_config(path, overrides)
        trainer = Trainer(cfg)
        try:
            batches = iter(trainer.train_loader)
            next(batches)  # workers started, first batch
            start, images = time.perf_counter(), 0
            for _ in range(loader_batches):
                images += next(batches)[0].shape[0]
            loader_ips = images / (time.perf_counter() - start)
            del batches
            trainer.fit()
        finally:
            trainer.close()
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    windows = [r for r in rows if "img_per_sec" in r][1:]
    if not windows:
        raise RuntimeError(
            f"{path}: {steps} steps at log_every={log_every} left no timed window after the first"
        )
    return {
        "model": cfg.model_name,
        "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "precision": cfg.train.precision,
        "steps": steps,
        "flops_per_image": trainer.flops_per_image,
        "matmul_ceiling_gflops": trainer.ceiling / 1e9,
        "img_per_s": statistics.median(r["img_per_sec"] for r in windows),
        "img_per_s_windows": [r["img_per_sec"] for r in windows],
        "mfu": statistics.median(r["mfu"] for r in windows),
        "mfu_windows": [r["mfu"] for r in windows],
        "loader_img_per_s": loader_ips,
    }


def _worker_main(spec: str) -> None:
    threads, kind, *args = json.loads(spec)
    if threads:
        torch.set_num_threads(threads)
    workers: dict[str, Callable[..., Any]] = {
        "time": time_worker,
        "memory": memory_worker,
        "recipe": recipe_worker,
    }
    fn = workers[kind]
    print(json.dumps(fn(*args)))


def run_benchmark(
    configs: list[str],
    dtypes: list[str],
    rounds: int = 3,
    warmup: int = 1,
    steps: int = 3,
    progress=None,
    threads: int = 0,
    memory: bool = True,
    adamw: str = "default",
    recipes: list[str] | None = None,
    recipe_steps: int = 60,
    recipe_log_every: int = 10,
    compile: str = "none",
    live_memory: bool = True,
) -> dict:
    """Time mimkit and the peer alternating over `rounds` for every config x dtype (one process each),
    then measure each one's peak memory in its own fresh process; medians, ratios and % of the ceiling.
    `compile` ("mimkit" or "both") adds the regionally compiled variants to the same alternation.
    Then train each recipe in `recipes` briefly through the trainer (its img/s, MFU and loader speed)."""
    from ..engine.perf import measure_matmul_ceiling
    from ..methods.mae import mae_flops_per_image
    from ..registry import model_config

    say = progress or (lambda msg: None)
    if threads:
        torch.set_num_threads(threads)
    base = available_impls()
    impls = base + tuple(i + COMPILED for i in COMPILE_CHOICES[compile] if i in base)
    missing = transformers_missing()
    ceiling = {
        "fp32": measure_matmul_ceiling(torch.float32),
        "bf16": measure_matmul_ceiling(torch.bfloat16),
    }
    report: dict[str, Any] = {
        "machine": machine_info(),
        "matmul_ceiling_gflops": {k: v / 1e9 for k, v in ceiling.items()},
        "matmul_ceilings_by_threads_gflops": matmul_ceilings((1, 2, torch.get_num_threads())),
        "settings": {
            "rounds": rounds,
            "warmup": warmup,
            "steps": steps,
            "adamw": adamw,
            "threads": threads,
            "compile": compile,
            "implementations": list(impls),
            "live_memory": live_memory,
            "recipe_steps": recipe_steps if recipes else None,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        },
        "peer": {"name": "transformers.ViTMAEForPreTraining (sdpa)", "available": missing is None}
        | ({"note": missing} if missing else {}),
        "results": {},
    }
    say(
        f"{report['machine']['cpu']['model_name']}; ceilings (GFLOP/s) {report['matmul_ceilings_by_threads_gflops']}"
    )
    if missing:
        say(f"peer skipped: {missing}")
    for name in configs:
        model_name, batch_size = CONFIGS[name]
        flops = mae_flops_per_image(model_config(model_name))
        for dtype in dtypes:
            t = _spawn(
                "time",
                model_name,
                batch_size,
                dtype,
                rounds,
                warmup,
                steps,
                adamw,
                list(impls),
                threads=threads,
            )
            entry: dict[str, Any] = {"model": model_name, "batch_size": batch_size, "flops_per_image": flops}
            for impl in impls:
                ips = [batch_size / s for s in t["step_s_rounds"][impl]]
                med = statistics.median(ips)
                entry[impl] = {
                    "img_per_s": med,
                    "img_per_s_rounds": ips,
                    "pct_of_ceiling": 100 * med * flops / ceiling[dtype],
                }
                if impl.endswith(COMPILED) and impl in t.get("first_step_s", {}):
                    entry[impl]["compile_s"] = t["first_step_s"][impl] - batch_size / med
                say(f"{name} {dtype} {impl}: {med:.2f} img/s (rounds {[round(x, 2) for x in ips]})")
            for ours, peer, key in (
                ("mimkit", "peer", "speed_ratio"),
                ("mimkit" + COMPILED, "peer", "speed_ratio_compiled"),
                ("mimkit" + COMPILED, "peer" + COMPILED, "speed_ratio_both_compiled"),
                ("mimkit" + COMPILED, "mimkit", "compiled_vs_eager"),
            ):
                if ours in impls and peer in impls:
                    ours_r, peer_r = entry[ours]["img_per_s_rounds"], entry[peer]["img_per_s_rounds"]
                    entry[key] = entry[ours]["img_per_s"] / entry[peer]["img_per_s"]
                    entry[key + "_rounds"] = [m / p for m, p in zip(ours_r, peer_r)]
                    entry[key + "_median_of_rounds"] = statistics.median(entry[key + "_rounds"])
            if memory:
                for impl in impls:
                    args = ("memory", model_name, batch_size, dtype, impl, adamw)
                    entry[impl] |= _spawn(*args, threads=threads)
                    if live_memory:
                        live = _spawn(*args, threads=threads, env=LIVE_MEMORY_ENV)
                        entry[impl]["peak_live_delta_mb"] = live["peak_rss_delta_mb"]
                if "peer" in impls:
                    pairs = [("peak_rss_delta_mb", "memory_ratio")]
                    if live_memory:
                        pairs.append(("peak_live_delta_mb", "memory_ratio_live"))
                    for key, ratio in pairs:
                        entry[ratio] = entry["mimkit"][key] / entry["peer"][key]
                        if "mimkit" + COMPILED in impls:
                            entry[ratio + "_compiled"] = entry["mimkit" + COMPILED][key] / entry["peer"][key]
                    live_note = f" (live {entry['memory_ratio_live']:.2f})" if live_memory else ""
                    say(f"{name} {dtype}: peak-memory ratio {entry['memory_ratio']:.2f}{live_note}")
            report["results"][f"{name}_{dtype}"] = entry
    if recipes:
        report["recipes"] = {}
        for path in recipes:
            res = _spawn("recipe", path, recipe_steps, recipe_log_every, ceiling["bf16"], threads=threads)
            report["recipes"][os.path.basename(path)] = res
            say(f"{os.path.basename(path)}: {res['img_per_s']:.1f} img/s, MFU {res['mfu']:.1%}, "
                f"loader alone {res['loader_img_per_s']:.0f} img/s")  # fmt: skip
        mfus = {k: v["mfu"] for k, v in report["recipes"].items()}
        mae = next((v for k, v in mfus.items() if k.startswith("mae")), None)
        if mae:
            report["recipes_mfu_vs_mae"] = {k: v / mae for k, v in mfus.items()}
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["matmul_ceiling_gflops_end"] = {
        "fp32": measure_matmul_ceiling(torch.float32) / 1e9,
        "bf16": measure_matmul_ceiling(torch.bfloat16) / 1e9,
    }
    return report


def markdown_tables(report: dict) -> str:
    """The report as docs/performance.md tables: machine line, one row per config x dtype, the recipes."""
    cpu = report["machine"]["cpu"]
    flags = ", ".join(k for k, v in cpu["flags"].items() if v) + ("; AMX" if cpu["amx"] else "; no AMX")
    ceilings = report.get("matmul_ceilings_by_threads_gflops", {})
    by_threads = "; ".join(
        f"{dtype} " + " / ".join(f"{v:.0f} ({n} thr)" for n, v in sorted(ceilings[dtype].items()))
        for dtype in ceilings
    )
    lines = [
        f'Machine: `lscpu` "{cpu["model_name"]}", family {cpu["family"]} model {cpu["model"]}, '
        f"{cpu['cores']} cores ({flags}); threads {report['machine']['threads']}; load "
        f"{report['machine']['loadavg_start'][0]:.1f} -> {report['machine'].get('loadavg_end', [float('nan')])[0]:.1f}; "
        f"ceilings GFLOP/s: start fp32 {report['matmul_ceiling_gflops']['fp32']:.0f}, bf16 "
        f"{report['matmul_ceiling_gflops']['bf16']:.0f}; end "
        + ", ".join(f"{k} {v:.0f}" for k, v in report.get("matmul_ceiling_gflops_end", {}).items())
        + f"; by threads: {by_threads}; settings {json.dumps(report['settings'])}",
        "",
        "| config | impl | img/s (rounds) | % of ceiling | vs peer (median of rounds) | peak RSS above baseline |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in report["results"].items():
        for impl, row in entry.items():
            if not isinstance(row, dict) or "img_per_s" not in row:
                continue
            rounds = ", ".join(f"{x:.2f}" for x in row["img_per_s_rounds"])
            ratio = ""
            if impl != "peer" and "peer" in entry:
                key = "speed_ratio" if impl == "mimkit" else "speed_ratio_compiled"
                if key in entry:
                    ratio = f"{entry[key]:.2f} ({entry[key + '_median_of_rounds']:.2f})"
            mem = f"{row['peak_rss_delta_mb']:.0f} MB" if "peak_rss_delta_mb" in row else "-"
            if impl == "mimkit" and "memory_ratio" in entry:
                mem += f" ({entry['memory_ratio']:.2f}x peer)"
            if "compile_s" in row:
                impl += f" (compile {row['compile_s']:.0f} s)"
            lines.append(
                f"| {name} | {impl} | {row['img_per_s']:.2f} ({rounds}) | {row['pct_of_ceiling']:.1f}% | {ratio} | {mem} |"
            )
    if report.get("recipes"):
        lines += [
            "",
            "| recipe | batch | img/s | trainer MFU | vs MAE | loader alone img/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in report["recipes"].items():
            vs = report.get("recipes_mfu_vs_mae", {}).get(name, float("nan"))
            lines.append(
                f"| {name} | {r['batch_size']} | {r['img_per_s']:.1f} | {100 * r['mfu']:.1f}% | {vs:.2f} | "
                f"{r['loader_img_per_s']:.0f} |"
            )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per config (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (median step time)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument(
        "--no-live-memory", action="store_true",
        help="skip the second memory pair (MALLOC_MMAP_THRESHOLD_=131072, tensors alive at once): half the memory time",
    )  # fmt: skip
    p.add_argument("--no-peer", action="store_true", help="mimkit alone, even when transformers is installed")
    p.add_argument(
        "--compile", choices=list(COMPILE_CHOICES), default="none",
        help="also time regionally compiled blocks (torch.compile per block; compile time reported) of mimkit "
        "('mimkit') or of both ('both'), alternating with the eager runs",
    )  # fmt: skip
    p.add_argument(
        "--adamw", choices=["default", "fused"], default="default", help="AdamW implementation (both sides)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    p.add_argument(
        "--recipes", nargs="*", default=[], metavar="YAML",
        help="also train these recipes briefly through the trainer (e.g. configs/*_tiny_fmnist.yaml): img/s, MFU",
    )  # fmt: skip
    p.add_argument("--recipe-steps", type=int, default=60, help="optimizer steps per recipe")
    p.add_argument("--recipe-log-every", type=int, default=10, help="steps per timed window (first dropped)")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument(
        "--table",
        metavar="JSON",
        default=None,
        help="print an earlier report as markdown tables, run nothing",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    if args.table:
        with open(args.table) as f:
            print(markdown_tables(json.load(f)))
        return 0
    if args.no_peer:
        os.environ["MIMKIT_BENCH_NO_PEER"] = "1"  # the worker processes inherit it

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    report = run_benchmark(
        args.configs, args.dtypes, args.rounds, args.warmup, args.steps, progress, args.threads,
        not args.no_memory, args.adamw, args.recipes, args.recipe_steps, args.recipe_log_every, args.compile,
        not args.no_live_memory,
    )  # fmt: skip
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
        help="train-step throughput of mimkit MAE (vs Hugging Face ViTMAE when transformers is installed), JSON",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        parser = argparse.ArgumentParser(prog="python -m mimkit.commands.bench")
        add_arguments(parser)
        sys.exit(run(parser.parse_args()))
