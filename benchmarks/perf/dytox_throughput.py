#!/usr/bin/env python
"""Train-step throughput and peak memory of the CIFAR DyTox model (embed 384, 5 GPSA SABs + 1 TAB, 10.7 M).

One train step = forward + DyTox loss (BCE + KD against a frozen teacher + divergence head, as the method's
training_step computes it from the second task on) + backward + AdamW step, on random 32x32 images.
Measured for batch 32 and 128, at task 1 (one token; no teacher, no divergence head) and at a later task
(`--tasks`, default 10: ten tokens through the TAB, a teacher with nine), with the attention paths the
method uses by default (fused SDPA TAB, batched tokens) and, with --variants, the others (explicit TAB,
per-token loop, fused GPSA) so their cost can be compared.

Each configuration runs in a FRESH subprocess (not with --quick / --in-process), so its peak memory is its own:
- CPU: peak resident set size (getrusage ru_maxrss) minus the RSS before the first step (tracemalloc does not
  see torch's allocations); it includes the allocator's caching;
- GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
Throughput is the median over `--repeats` timed runs of `--steps` steps each, after `--warmup` steps: the
machine may be shared with other jobs, and the median is robust to their bursts. The JSON (default
benchmarks/results/dytox_throughput.json) records the load average and thread count next to the numbers.

  python benchmarks/perf/dytox_throughput.py                 # full: batch 32/128, task 1 and 10 (minutes on CPU)
  python benchmarks/perf/dytox_throughput.py --quick         # seconds: tiny model, for CI
  python benchmarks/perf/dytox_throughput.py --variants      # + explicit / per-token / fused-GPSA paths
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dytox_throughput.json"
QUICK_MODEL = dict(embed_dim=32, depth=2, num_heads=4, local_up_to_layer=1)

VARIANTS = {
    "default": dict(fused_attention=True, batched_tokens=True, fused_gpsa=False),
    "explicit_tab": dict(fused_attention=False, batched_tokens=True, fused_gpsa=False),
    "token_loop": dict(fused_attention=True, batched_tokens=False, fused_gpsa=False),
    "fused_gpsa": dict(fused_attention=True, batched_tokens=True, fused_gpsa=True),
}


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024      # Linux reports KiB


def measure(job: dict) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from harness.core.method import PhaseConfig, TaskInfo
    from harness.core.loop import build_optimizer
    from methods.dytox.method import DyToxMethod

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    torch.manual_seed(0)
    per_task = job["classes_per_task"]
    config = {"head_div": 0.1, "head_div_mode": ["tr"], "freeze_task": ["old_task_tokens", "old_heads"],
              "freeze_ft": ["sab"], "image_size": 32, **job["model"], **VARIANTS[job["variant"]]}
    method = DyToxMethod(config, device)
    method.build()
    tasks = job["tasks"]
    for t in range(tasks):
        task = TaskInfo(t, tasks, tuple(range(t * per_task, (t + 1) * per_task)), t * per_task, tasks * per_task)
        method.before_task(task)
    phase = PhaseConfig(epochs=1, batch_size=job["batch"], lr=1.25e-4, opt="adamw",
                        weight_decay=1e-6, sched="constant")
    method.before_phase(phase, task)
    method.net = method.model
    method.model.train()
    optimizer = build_optimizer([p for p in method.model.parameters() if p.requires_grad], phase)
    amp = torch.bfloat16 if device.type == "cuda" and job["amp"] else None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(job["batch"], 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, tasks * per_task, (job["batch"],), generator=g).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = method.training_step((x, y), task, phase)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _rss_bytes()
    for _ in range(job["warmup"]):
        step()
    sync()
    rates = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        for _ in range(job["steps"]):
            step()
        sync()
        rates.append(job["batch"] * job["steps"] / (time.perf_counter() - start))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        peak_kind = "cuda max_memory_allocated"
    else:
        peak = max(0, _peak_rss_bytes() - rss_before)
        peak_kind = "cpu peak RSS - RSS before the first step"
    return {**{k: job[k] for k in ("batch", "tasks", "variant", "device")},
            "images_per_s_median": statistics.median(rates), "images_per_s_runs": rates,
            "step_ms_median": 1000 * job["batch"] / statistics.median(rates),
            "peak_memory_mib": peak / 2**20, "peak_memory_kind": peak_kind,
            "parameters": method.parameter_count(), "torch_threads": torch.get_num_threads(),
            "teacher": method.teacher is not None, "div_head": method.model.div_head is not None}


def _worker(job: dict, queue) -> None:
    try:
        queue.put(measure(job))
    except Exception as exc:  # noqa: BLE001 -- reported in the table
        queue.put({**job, "error": f"{type(exc).__name__}: {exc}"})


def run_isolated(job: dict) -> dict:
    ctx = mp.get_context("spawn")          # a fresh interpreter: its peak RSS is this configuration's
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(job, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def table(rows: list[dict]) -> str:
    head = "| batch | tasks | variant | images/s (median) | step ms | peak memory MiB | runs |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']} | {r['tasks']} | {r['variant']} | error: {r['error']} | | | |")
            continue
        runs = ", ".join(f"{v:.1f}" for v in r["images_per_s_runs"])
        lines.append(f"| {r['batch']} | {r['tasks']} | {r['variant']} | {r['images_per_s_median']:.1f} | "
                     f"{r['step_ms_median']:.0f} | {r['peak_memory_mib']:.0f} | {runs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 short run per configuration (CI)")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 10], help="number of tasks (tokens) grown")
    p.add_argument("--classes-per-task", type=int, default=10)
    p.add_argument("--variants", action="store_true", help="also the explicit / per-token / fused-GPSA paths")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median reported)")
    p.add_argument("--steps", type=int, default=3, help="train steps per timed run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of one fresh subprocess per configuration (faster to "
                        "start; peak memory then accumulates across configurations). Implied by --quick")
    p.add_argument("--no-amp", action="store_true", help="GPU: fp32 instead of bf16 autocast")
    p.add_argument("--out", default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)}; "
                                               "--quick: benchmarks/results/dytox_throughput_quick.json)")
    args = p.parse_args(argv)

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = QUICK_MODEL if args.quick else {}
    repeats, steps, warmup = (2, 1, 1) if args.quick else (args.repeats, args.steps, args.warmup)
    batches = [8] if args.quick and args.batches == [32, 128] else args.batches
    tasks = [1, 3] if args.quick and args.tasks == [1, 10] else args.tasks
    variants = list(VARIANTS) if args.variants else ["default"]
    load_before = os.getloadavg()
    rows = []
    for batch in batches:
        for n_tasks in tasks:
            for variant in variants:
                job = dict(batch=batch, tasks=n_tasks, variant=variant, device=device, model=model,
                           classes_per_task=args.classes_per_task, repeats=repeats, steps=steps, warmup=warmup,
                           threads=args.threads, amp=not args.no_amp)
                row = measure(job) if args.in_process or args.quick else run_isolated(job)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    out = Path(args.out) if args.out else (
        DEFAULT_OUT.with_name("dytox_throughput_quick.json") if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": "quick (embed 32, 1 SAB + 1 TAB)" if args.quick else
           "CIFAR DyTox (embed 384, 5 GPSA SABs + 1 TAB, 12 heads, patch 4, 32 px)",
           "step": "forward + BCE/KD(teacher)/divergence loss + backward + AdamW step (method.training_step)",
           "device": device, "amp": "bf16" if device == "cuda" and not args.no_amp else "none",
           "torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "repeats": repeats, "steps_per_run": steps, "warmup_steps": warmup, "results": rows}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\nload average before/after: {load_before} / {os.getloadavg()}; written: {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
