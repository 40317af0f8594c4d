#!/usr/bin/env python
"""Throughput (images/s) of the TRAINING augmentations: per-image torchvision v2 path vs batched tensor path.

  python benchmarks/perf/data_pipeline.py            # full: 32 px + 224 px, workers 0/1/2, 3 repeats
  python benchmarks/perf/data_pipeline.py --quick    # seconds (CI, tests/test_perf.py)

Pipelines (the harness's own transforms, harness.data.build_transform / harness.data.batched):
  standard     32 px: pad 4 + random crop, flip, normalise.   224 px: random resized crop, flip, normalise
  randaug+ra3  the above + RandAugment (n2, m9) + repeated augmentation x3 (GlobalBatchSampler, DyTox/DeiT)
Paths:
  per-image    TaskDataset + build_transform in the DataLoader (workers 0 = in the main process)
  batched      TaskDataset returns uint8 images (224 px: after the per-image random resized crop), the main
               process applies harness.data.batched.BatchedTrainTransform to each batch (on the GPU when there:
               the path `batched-cuda`, timed with the host->device copy)
Data: 32 px = the shipped cifar10-mini train split (3,000 real CIFAR-10 JPEGs decoded once into memory);
224 px = SYNTHETIC random uint8 arrays in memory (throughput of the augmentations only: no JPEG decoding).

Timing: per config, a one-batch warm-up epoch starts the (persistent) workers, then one epoch of `--batches`
batches is timed (prefetching included);
configs are interleaved (per-image and batched back to back) and repeated, and the median is reported, because
the machine may be shared. The main process uses `--threads` intra-op threads (default 1: "per core"); each
DataLoader worker uses 1 (torch's default in workers). Cores used = max(1, workers) for per-image and
1 + workers for batched (the main process augments). A reference model train step (ResNet-32 at 32 px,
ResNet-18 at 224 px, fp32, channels-last, 1 thread) gives the "pipeline / model per core" ratio
(target >= 5). Writes JSON (default benchmarks/results/perf_data_pipeline.json).
"""
from __future__ import annotations

import argparse

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perfutil  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from harness.data import ArrayData, DatasetInfo, TaskDataset, build_transform, dataset_info, load_dataset  # noqa: E402
from harness.data.base import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from harness.data.batched import build_batched_transform  # noqa: E402
from harness.core.loop import GlobalBatchSampler  # noqa: E402

PIPELINES = {"standard": ({"augment": "standard"}, 1), "randaug+ra3": ({"augment": "randaugment"}, 3)}


def load_images(size: int, n: int, seed: int = 0) -> tuple[ArrayData, DatasetInfo]:
    if size == 32:
        data = load_dataset("cifar10-mini", None, "train")
        return data.subset(np.arange(min(n, len(data)))), dataset_info("cifar10-mini")
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    info = DatasetInfo("synthetic", 10, size, IMAGENET_MEAN, IMAGENET_STD)
    return ArrayData(x, rng.integers(0, 10, size=n), [str(i) for i in range(10)]), info


class _WarmupSampler(GlobalBatchSampler):
    """Epoch 0 yields one batch (starts the persistent workers, not timed); later epochs yield every batch."""

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if self.epoch == 0 and i > 0:
                return
            yield batch


def run_config(data: ArrayData, info: DatasetInfo, pipeline: str, path: str, workers: int, batch: int,
               seed: int) -> float:
    """Images/s of one epoch over `data` (len(data) // batch batches), after a one-batch warm-up epoch that
    starts the (persistent) workers; the timed epoch includes the workers' prefetching."""
    options, repeats = PIPELINES[pipeline]
    device = torch.device("cuda" if path == "batched-cuda" else "cpu")
    if path == "per-image":
        dataset, batch_tf = TaskDataset(data, build_transform(info, train=True, options=options)), None
    else:
        batch_tf = build_batched_transform(info, options)
        dataset = TaskDataset(data, batch_tf.per_image)
    sampler = _WarmupSampler(len(dataset), batch, seed=seed, repeats=repeats)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def epoch() -> int:
        seen = 0
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            if batch_tf is not None:
                x = batch_tf(x)
            seen += x.shape[0]
        sync()
        return seen

    sampler.set_epoch(0)
    epoch()
    sampler.set_epoch(1)
    start = time.perf_counter()
    seen = epoch()
    return seen / (time.perf_counter() - start)


def model_reference(size: int, batch: int, steps: int) -> float:
    """Train-step images/s of the model the pipeline feeds (1 thread, fp32, channels-last, SGD)."""
    from harness.core.backbones import build_backbone
    from methods.common import IncrementalNet

    net = IncrementalNet(build_backbone("resnet32" if size == 32 else "resnet18"))
    net.add_classes(10)
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    step()
    times = [perfutil.timed(step) for _ in range(steps)]
    return batch / perfutil.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: seconds (CI)")
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    p.add_argument("--batch", type=int, default=128, help="32 px batch (224 px uses a quarter)")
    p.add_argument("--batches", type=int, default=8, help="timed batches per config (after a warm-up batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the main process")
    p.add_argument("--no-model", action="store_true", help="skip the reference model train step")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.workers = [w for w in args.workers if w <= 1]
        args.batch, args.batches, args.repeats = 16, 3, 1
    args.output = args.output or perfutil.default_output("data_pipeline", args.quick)
    torch.set_num_threads(args.threads)

    paths = ["per-image", "batched"] + (["batched-cuda"] if torch.cuda.is_available() else [])
    data = {}
    for size in args.sizes:
        batch = args.batch if size <= 64 else max(4, args.batch // 4)
        data[size] = (*load_images(size, batch * args.batches), batch)
    configs = [(s, pl, w, path) for s in args.sizes for pl in args.pipelines for w in args.workers for path in paths]
    runs: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for c in configs:             # per-image and batched of one (size, pipeline, workers) back to back
            size, pipeline, workers, path = c
            images, info, batch = data[size]
            runs[c].append(run_config(images, info, pipeline, path, workers, batch, seed=r))
            print(f"repeat {r + 1}/{args.repeats} {size:>3}px {pipeline:11s} workers {workers} {path:12s} "
                  f"{runs[c][-1]:8.0f} img/s", flush=True)

    model = {}
    if not args.no_model:
        for size in args.sizes:
            small = size <= 64
            batch, steps = (8, 1) if args.quick else ((64, 3) if small else (16, 2))
            if args.quick and not small:
                continue              # a ResNet-18 step at 224 px takes seconds: full mode only
            model[size] = {"model": "resnet32" if small else "resnet18", "batch": batch, "threads": 1,
                           "images_per_s": model_reference(size, batch, steps)}
            print(f"reference model {model[size]['model']} at {size}px: {model[size]['images_per_s']:.1f} img/s "
                  "(1 thread)", flush=True)

    rows, results = [], []
    for size, pipeline, workers, path in configs:
        ips = perfutil.median(runs[(size, pipeline, workers, path)])
        cores = max(1, workers) if path == "per-image" else 1 + workers
        base = perfutil.median(runs[(size, pipeline, workers, "per-image")])
        ref = model.get(size, {}).get("images_per_s")
        entry = {"size": size, "pipeline": pipeline, "workers": workers, "path": path,
                 "device": "cuda" if path == "batched-cuda" else "cpu", "batch": data[size][2],
                 "images_per_s": ips, "runs": runs[(size, pipeline, workers, path)], "cores_used": cores,
                 "images_per_s_per_core": ips / cores, "speedup_vs_per_image": ips / base,
                 "per_core_vs_model": (ips / cores) / ref if ref else None}
        results.append(entry)
        rows.append([f"{size}px", pipeline, workers, path, ips, cores, ips / cores, f"{ips / base:.2f}x",
                     f"{entry['per_core_vs_model']:.0f}x" if ref else "-"])
    machine = perfutil.machine_info()
    report = {"benchmark": "data_pipeline", "quick": args.quick, "threads_main": args.threads,
              "batches": args.batches, "repeats": args.repeats, "results": results,
              "model_reference": {str(k): v for k, v in model.items()}, "machine": machine,
              "data": {"32": "cifar10-mini train (real JPEGs decoded in memory)",
                       "224": "synthetic random uint8 arrays in memory (no decoding)"}}
    print()
    print(f"training augmentations, median of {args.repeats}; {machine['cpu_model']}, {machine['cpus']} CPUs, "
          f"load {machine['load_average'][0]:.1f}; main process {args.threads} thread(s)")
    print(perfutil.markdown_table(["size", "pipeline", "workers", "path", "img/s", "cores", "img/s/core",
                                   "vs per-image", "per core / model"], rows))
    perfutil.write_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
