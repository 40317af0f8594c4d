#!/usr/bin/env python
"""Train-step throughput (images/s) and peak memory of each method's model, with and without the speed options.

  python benchmarks/perf/model_throughput.py             # full: batch 32 and 128, 2 rounds, + torch.compile
  python benchmarks/perf/model_throughput.py --quick     # seconds (CI): batch 4, one step, one process,
                                                         # a tiny DyTox (the numbers mean nothing)
  python benchmarks/perf/model_throughput.py --models icarl_t1 der_t10 --batches 128

Models (CIFAR, 32 px, 100 classes in 10 tasks of 10, the "task" is how many tasks the model has grown to):
  dytox_t1, dytox_t10  DyTox CIFAR network (methods.dytox: 6 blocks, 384 dims, 12 heads) — one step = CE on the
                       task heads (+ divergence head CE and KD from a frozen teacher copy from task 2 on)
  icarl_t1, icarl_t10  the registered `icarl` method (ResNet-32, growing classifier; KD from its teacher at t10)
  der_t1, der_t10      the registered `der` method: 1 or 10 ResNet-32 extractors (9 frozen at t10) + aux head
One step = the method's training_step + backward + SGD step, exactly what harness.core.loop runs per batch.

Variants, measured in the same run and interleaved (round r runs every variant of a config back to back):
  CNNs:   nchw (the plain layout) vs channels_last (`channels_last: auto` picks it for CNNs)
  DyTox:  explicit (softmax attention everywhere) vs sdpa (default: the task-attention block uses
          F.scaled_dot_product_attention) vs sdpa+gpsa (also the GPSA content attention, `fused_gpsa`)
  `compiled` (full mode, icarl_t1 and dytox_t1 at the largest batch; --no-compile skips it): torch.compile of
  the network on top of the default eager variant (channels-last / sdpa); the first step's time, which includes
  the compilation, is reported separately.
CPU: fp32, 1 intra-op thread by default (`--threads`; per-core numbers, and on a shared machine 2 threads on 2
busy vCPUs ran 4x SLOWER than 1), every config in a fresh subprocess; peak memory = that process's max RSS (resource.getrusage), also
given as the growth over the RSS after building the model. GPU (picked when CUDA is there): AMP bf16 and
torch.cuda.max_memory_allocated. Writes JSON (default benchmarks/results/perf_model_throughput.json).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perfutil  # noqa: E402

QUICK_DYTOX = dict(embed_dim=32, depth=2, num_heads=4, local_up_to_layer=1)   # --quick: code paths, not speed
MODELS = ("dytox_t1", "dytox_t10", "icarl_t1", "icarl_t10", "der_t1", "der_t10")
CLASSES_PER_TASK, NUM_TASKS = 10, 10


def variants_of(model: str, compile_too: bool) -> list[str]:
    base = ["explicit", "sdpa", "sdpa+gpsa"] if model.startswith("dytox") else ["nchw", "channels_last"]
    return base + (["compiled"] if compile_too else [])


# ---- one config, in a worker process ---------------------------------------------------------------------

def _rss_mb() -> float:
    """Current resident set size (MB), from /proc (Linux); NaN elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _task(t: int):
    from harness.core.method import TaskInfo

    new = tuple(range(t * CLASSES_PER_TASK, (t + 1) * CLASSES_PER_TASK))
    return TaskInfo(task_id=t, num_tasks=NUM_TASKS, new_classes=new, num_old_classes=t * CLASSES_PER_TASK,
                    num_total_classes=NUM_TASKS * CLASSES_PER_TASK)


def build_step(model: str, variant: str, device, amp, quick: bool = False):
    """(train-step function of (x, y) -> loss, the nn.Module trained, whether the model is channels-last)."""
    import torch
    import torch.nn.functional as F

    name, tasks = model.rsplit("_t", 1)
    tasks = int(tasks)
    if name == "dytox":
        from methods.dytox import DyTox, DyToxConfig

        size = QUICK_DYTOX if quick else {}
        net = DyTox(DyToxConfig(fused_attention=variant != "explicit", fused_gpsa=variant == "sdpa+gpsa", **size))
        for _ in range(tasks - 1):
            net.add_task(CLASSES_PER_TASK)
        net = net.to(device)
        teacher = None
        if tasks > 1:        # DyTox distils from the model of the previous task: a frozen copy, in eval
            teacher = copy.deepcopy(net).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        net.add_task(CLASSES_PER_TASK)
        if tasks > 1:
            net.freeze(["old_task_tokens", "old_heads"])
        net.train()
        fwd = torch.compile(net) if variant == "compiled" else net
        n_old = (tasks - 1) * CLASSES_PER_TASK

        def step_loss(x, y):
            out = fwd(x)
            loss = F.cross_entropy(out["logits"], y)
            if out["div_logits"] is not None:       # new classes -> 1.., old -> 0
                div_y = torch.where(y < n_old, torch.zeros_like(y), y - n_old + 1)
                loss = loss + F.cross_entropy(out["div_logits"], div_y)
            if teacher is not None:
                with torch.no_grad():
                    old = teacher(x)["logits"]
                loss = loss + F.kl_div(F.log_softmax(out["logits"][:, :n_old] / 2, 1), F.softmax(old / 2, 1),
                                       reduction="batchmean") * 4
            return loss

        return step_loss, net, False

    from harness.config.compose import resolve_config
    from harness.config.catalog import get_method
    from harness.config.phases import main_phase

    config = resolve_config(name, "cifar100", overrides={"backbone": "resnet32"})
    method = get_method(name)(config, device)
    method.build()
    for t in range(tasks):
        method.before_task(_task(t))
    task = _task(tasks - 1)
    phase = main_phase(config, task.task_id)
    channels_last = variant in ("channels_last", "compiled")    # compiled: on top of the best eager layout
    if channels_last:
        method.model.to(memory_format=torch.channels_last)
    method.model.train()
    method.net = torch.compile(method.model) if variant == "compiled" else method.model

    def step_loss(x, y):
        return method.training_step((x, y), task, phase)

    return step_loss, method.model, channels_last


def run_worker(config: dict) -> dict:
    """Time `steps` train steps (after `warmup`) of one (model, batch, variant) in this process."""
    import torch

    if config.get("threads") and config["device"] == "cpu":
        torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    amp = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(0)
    step_loss, net, channels_last = build_step(config["model"], config["variant"], device, amp,
                                               quick=config.get("quick", False))
    rss_built = _rss_mb()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    b = config["batch"]
    x = torch.randn(b, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seen = int(config["model"].rsplit("_t", 1)[1]) * CLASSES_PER_TASK
    y = torch.randint(0, seen, (b,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = step_loss(x, y)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    first = perfutil.timed(step, sync)           # includes torch.compile's compilation for `compiled`
    for _ in range(config["warmup"] - 1):
        step()
    times = [perfutil.timed(step, sync) for _ in range(config["steps"])]
    result = {**config, "step_s": times, "worker_s": time.perf_counter() - t0, "first_step_s": first, "rss_after_build_mb": rss_built,
              "params_trained": sum(p.numel() for p in params), "params": sum(p.numel() for p in net.parameters())}
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:   # ru_maxrss is in kB on Linux
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _spawn(configs: list[dict]) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(configs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=perfutil.ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed for {configs[0]['model']} {configs[0]['variant']}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- driver ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 4, one step, all configs in one process (CI)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    p.add_argument("--steps", type=int, default=3, help="timed steps per config and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the median is over all steps)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (icarl_t1, dytox_t1)")
    p.add_argument("--no-compile", action="store_true", help="full mode: skip the torch.compile variant")
    p.add_argument("--device", default="auto", help="auto (CUDA when there) | cpu | cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: per-core numbers; 0 = torch's default, one per core)")
    p.add_argument("--output", default=None)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps([run_worker(c) for c in json.loads(args.worker)]))
        return 0

    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    compile_models = {"icarl_t1", "dytox_t1"} if (args.compile or not (args.quick or args.no_compile)) else set()
    if args.quick:
        args.batches, args.steps, args.warmup, args.rounds = [4], 1, 1, 1
    args.output = args.output or perfutil.default_output("model_throughput", args.quick)

    configs = [{"model": m, "batch": b, "variant": v, "device": device, "steps": args.steps,
                "warmup": args.warmup, "threads": args.threads, "quick": args.quick}
               for m in args.models for b in args.batches
               for v in variants_of(m, m in compile_models and b == max(args.batches))]
    results: dict[tuple, list[dict]] = {}
    started = time.perf_counter()
    if args.quick:      # one process for everything: the memory column is then NOT per config
        for r in _spawn(configs):
            results.setdefault((r["model"], r["batch"], r["variant"]), []).append(r)
    else:
        for rnd in range(args.rounds):
            for c in configs:       # the variants of one (model, batch) follow each other
                (r,) = _spawn([c])
                results.setdefault((c["model"], c["batch"], c["variant"]), []).append(r)
                print(f"round {rnd + 1}/{args.rounds} {c['model']:9s} batch {c['batch']:3d} {c['variant']:13s} "
                      f"{c['batch'] / perfutil.median(r['step_s']):7.1f} img/s  peak {r['peak_mb']:6.0f} MB",
                      flush=True)

    rows, out = [], []
    for (model, batch, variant), rs in results.items():
        steps = [s for r in rs for s in r["step_s"]]
        step_s = perfutil.median(steps)
        base_variant = variants_of(model, False)[0]
        base = perfutil.median([s for r in results[(model, batch, base_variant)] for s in r["step_s"]])
        peak = max(r["peak_mb"] for r in rs)
        growth = peak - min(r["rss_after_build_mb"] for r in rs)
        entry = {"model": model, "batch": batch, "variant": variant, "device": device,
                 "images_per_s": batch / step_s, "step_s_median": step_s, "step_s": steps,
                 "speedup_vs_" + base_variant: base / step_s, "speedup": base / step_s,
                 "first_step_s": perfutil.median([r["first_step_s"] for r in rs]), "peak_mb": peak,
                 "peak_growth_over_model_mb": growth if device == "cpu" else None,
                 "params": rs[0]["params"], "params_trained": rs[0]["params_trained"]}
        out.append(entry)
        rows.append([model, batch, variant, batch / step_s, f"{base / step_s:.2f}x vs {base_variant}",
                     entry["first_step_s"], peak, growth if device == "cpu" else "-", f"{rs[0]['params'] / 1e6:.2f}"])
    machine = perfutil.machine_info()
    report = {"benchmark": "model_throughput", "quick": args.quick, "device": device, "threads": args.threads,
              "precision": "bf16 autocast" if device == "cuda" else "fp32", "steps": args.steps,
              "warmup": args.warmup, "rounds": args.rounds, "results": out, "machine": machine,
              "memory": ("torch.cuda.max_memory_allocated" if device == "cuda" else
                         "max RSS of a fresh process per config" + (" (quick: ONE process for all)" if args.quick
                                                                    else "")),
              "wall_s": time.perf_counter() - started}
    print()
    print(f"train step, {device} ({report['precision']}), median of {args.steps} step(s) x {args.rounds} round(s); "
          f"{machine['cpu_model']}, {machine['cpus']} CPUs, {args.threads if device == 'cpu' else '-'} thread(s), "
          f"load {machine['load_average'][0]:.1f}")
    print(perfutil.markdown_table(["model", "batch", "variant", "img/s", "speed-up", "first step (s)", "peak MB",
                                   "train growth MB", "params (M)"], rows))
    perfutil.write_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
