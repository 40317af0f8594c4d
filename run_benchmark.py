#!/usr/bin/env python
"""Class-incremental continual-learning benchmark harness.

  python run_benchmark.py --method icarl --suite cifar100            # every order x seed of the suite
  python run_benchmark.py --method dytox --suite cifar10-mini --epochs 2
  python run_benchmark.py --list-methods | --list-suites
  python run_benchmark.py report --output-dir results              # leaderboard from an MLflow store
  python run_benchmark.py sweep --method icarl --suite cifar10-5x2 --space benchmarks/sweeps/icarl.yaml

Options resolve as: harness defaults < suite < method recipe < --options files (in order) < flags.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from harness.errors import ConfigError, HarnessError, ResourceError  # noqa: E402
from harness.run.preflight import OneLineParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="run_benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", help="registered method (see --list-methods)")
    p.add_argument("--suite", help="suite name from benchmarks/suites/ or a suite .yaml path (see --list-suites)")
    p.add_argument("--orders", nargs="+", help="class orders to run (names: natural, seed1993, order1..3, seedN); "
                                               "default: the suite's")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds to run; default: the suite's")
    p.add_argument("--recipe", help="named recipe in benchmarks/recipes/<method>/ (default: the suite's, else default)")
    p.add_argument("--options", nargs="+", default=[], metavar="YAML",
                   help="option files applied in order (DyTox-style composition); flags override them")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option (YAML value), e.g. --set lr=0.05 --set milestones=[10,20]")
    p.add_argument("--data-path", help="dataset directory (official layout)")
    p.add_argument("--download", action="store_true", help="download CIFAR into --data-path when missing")
    p.add_argument("--output-dir", default="results", help="where trials, checkpoints and tables go (default: ./results)")
    p.add_argument("--epochs", type=int, help="epochs for every task; milestones are rescaled proportionally")
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size (split across --num-workers)")
    p.add_argument("--lr", type=float, help="learning rate (first and later tasks)")
    p.add_argument("--memory-size", type=int, help="total rehearsal memory budget")
    p.add_argument("--num-workers", type=int, help="DDP workers per trial")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (same as --set compile=true; docs/PERFORMANCE.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    t = p.add_argument_group("tracking (MLflow; see docs/TRACKING.md)")
    t.add_argument("--tracking-uri", help="MLflow tracking URI: http://host:port (a running server, checked before "
                                          "training) or sqlite:////abs/path.db; default: <output-dir>/mlflow.db")
    t.add_argument("--experiment", default="clbench", help="MLflow experiment name (default: clbench)")
    t.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (results.json and tables only)")
    r = p.add_argument_group("launcher (Ray by default; see docs/CLUSTER.md)")
    r.add_argument("--launcher", choices=["ray", "local"], default="ray",
                   help="ray: each trial a Ray Train DDP job under a Ray Tune grid (default); "
                        "local: one trial after another in this process")
    r.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else start Ray on this machine)")
    r.add_argument("--max-concurrent-trials", type=int, metavar="N",
                   help="trials running at once (default: as many as the cluster holds)")
    r.add_argument("--cpus-per-worker", type=float, metavar="X",
                   help="CPUs Ray reserves per DDP worker, fractions allowed (default: fit the cluster)")
    r.add_argument("--gpus-per-worker", type=float, metavar="X",
                   help="GPUs per DDP worker (default: 1 when the cluster has GPUs, else 0)")
    r.add_argument("--max-failures", type=int, default=2, metavar="N",
                   help="restarts of a failed trial from its last finished task (Ray; default 2)")
    r.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress output")
    p.add_argument("--list-methods", action="store_true", help="list registered methods and exit")
    p.add_argument("--list-suites", action="store_true", help="list suites and exit")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict:
    from harness.config.compose import parse_overrides

    out = {"data_path": str(Path(args.data_path).resolve()) if args.data_path else None,
           "download": True if args.download else None, "batch_size": args.batch_size,
           "memory_size": args.memory_size, "num_workers": args.num_workers, "device": args.device,
           "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker,
           "orders": args.orders, "seeds": args.seeds}
    if args.compile:
        out["compile"] = True
    if args.batch_size is not None:      # every task's batch, as the flag says (not only the first task's)
        out["incremental_batch_size"] = args.batch_size
    if args.lr is not None:
        out.update(lr=args.lr, incremental_lr=args.lr)
    out.update(parse_overrides(args.set))
    return out


def check_flags(args: argparse.Namespace) -> None:
    """Flags that never reach the config (launcher settings) and --epochs, which is applied after composing."""
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be an integer >= 1, got {args.epochs}")
    if args.max_concurrent_trials is not None and args.max_concurrent_trials < 1:
        raise ConfigError(f"--max-concurrent-trials must be >= 1, got {args.max_concurrent_trials}")
    if args.max_failures < -1:
        raise ConfigError(f"--max-failures must be >= 0 (or -1: retry forever), got {args.max_failures}")
    if args.launcher == "local" and args.address:
        raise ConfigError("--address joins a Ray cluster: use it with --launcher ray (the default)")
    if not args.experiment.strip():
        raise ConfigError("--experiment must be a non-empty name, e.g. --experiment clbench")


@contextmanager
def os_errors_as_one_line(output_dir: Path) -> Iterator[None]:
    """A disk that fills up or a folder that turns read-only while the benchmark writes: one line, no traceback."""
    try:
        yield
    except OSError as exc:
        where = f" on {exc.filename}" if exc.filename else ""
        raise ResourceError(f"cannot write the results ({exc.strerror or type(exc).__name__}{where}); check that "
                            f"{output_dir} is writable and has free space, then rerun the same command to "
                            "resume") from None


def apply_epochs(config: dict, epochs: int) -> None:
    """--epochs N: N epochs for every task; milestones keep their relative position in the schedule."""
    for ep_key, ms_key in (("epochs", "milestones"), ("base_epochs", "base_milestones")):
        old = config.get(ep_key) or config.get("epochs")
        if config.get(ms_key) and old:
            config[ms_key] = sorted({max(1, round(m * epochs / old)) for m in config[ms_key] if m < old})
        config[ep_key] = epochs
    if config.get("warmup_epochs"):
        config["warmup_epochs"] = min(config["warmup_epochs"], max(0, epochs - 1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "sweep":     # `run_benchmark.py sweep ...`: hyper-parameter sweeps (docs/SWEEPS.md)
        from harness.sweep.driver import main as sweep_main

        try:
            return sweep_main(argv[1:])
        except KeyboardInterrupt:
            print("interrupted: run the same sweep command with --resume to continue it (finished trials are kept)",
                  file=sys.stderr)
            return 130
    if argv and argv[0] in ("report", "leaderboard"):   # leaderboard from any MLflow store (docs/TRACKING.md)
        from harness.tracking.report import main as report_main

        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    from harness.config.compose import compose_config, list_suites
    from harness.config.catalog import get_method, list_methods

    if args.list_methods:
        for name in list_methods():
            doc = (get_method(name).__doc__ or "").strip().splitlines()
            print(f"{name:12s} {doc[0] if doc else ''}")
        return 0
    if args.list_suites:
        from harness.config.compose import load_suite
        for name in list_suites():
            print(f"{name:24s} {load_suite(name).get('description', '')}")
        return 0
    if not args.method or not args.suite:
        raise ConfigError("--method and --suite are required (see --list-methods, --list-suites)")

    from harness.run.events import LaunchOptions, TrialEvents

    from harness.run.launch import launch, resolve_threads
    from harness.run.preflight import preflight
    from harness.run.results import summary_markdown, summary_table
    from harness.config.identity import expand_trials, fix_identity

    # Pre-flight: every check of the input before anything is written (no output folder, MLflow store or Ray).
    check_flags(args)
    config, origins = compose_config(args.method, args.suite, args.options, overrides_from_args(args),
                                     args.recipe)
    if args.epochs is not None:
        apply_epochs(config, args.epochs)
        origins.update({k: "--epochs" for k in ("epochs", "base_epochs", "milestones", "base_milestones")})
    output_dir = Path(args.output_dir).resolve()
    config["output_dir"] = str(output_dir)
    preflight(config, origins, output_dir=output_dir, launcher=args.launcher, address=args.address,
              tracking_uri=args.tracking_uri, tracking=not args.no_tracking, experiment=args.experiment)
    from harness.run.estimate import long_run_warning
    if (warning := long_run_warning(config)) is not None:     # estimated > 1 hour on this machine's device
        print(warning, file=sys.stderr)
    if args.launcher == "ray":   # on a cluster: join it, check shared folders and state API on every node
        from harness.run.cluster import preflight_cluster

        preflight_cluster(args.address, output_dir, config.get("data_path"),
                          None if args.no_tracking else args.tracking_uri, bool(config.get("download")), args.verbose)
    options = LaunchOptions(launcher=args.launcher, address=args.address,
                            max_concurrent_trials=args.max_concurrent_trials, max_failures=args.max_failures,
                            verbose=args.verbose)
    # What changes the numbers without being an option (the data read, threads per worker) joins the trial names.
    fix_identity(config, resolve_threads(config, options, len(config["orders"]) * len(config["seeds"])))
    specs = expand_trials(config)
    print(f"{len(specs)} trial(s): {args.method} on {config['suite']} "
          f"(orders {', '.join(s['order_name'] for s in specs[::len(config['seeds'])])}; seeds {config['seeds']}) "
          f"-> {output_dir}")
    with os_errors_as_one_line(output_dir):
        tracker = None
        if not args.no_tracking:    # the store was checked above; this creates it and the benchmark's parent run
            from harness.tracking.trackers import BenchmarkTracker

            tracker = BenchmarkTracker.for_benchmark(args.tracking_uri, output_dir, config, specs,
                                                     experiment=args.experiment)
        try:
            results = launch(specs, output_dir, options, progress=not args.quiet and sys.stderr.isatty(),
                             events=TrialEvents(print, tracker=tracker))
        except BaseException:
            if tracker is not None:
                tracker.abort()       # the parent run ends KILLED/FAILED, not RUNNING forever; rerun resumes it
            raise
        table = summary_table(results)
        output_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(output_dir / "summary.csv", index=False)
        (output_dir / "summary.md").write_text(summary_markdown(table) + "\n")
        board = tracker.end_benchmark(results, specs) if tracker is not None else None
        print()
        if board is not None and not board.empty:
            from harness.tracking.report import to_markdown as board_markdown, write_leaderboard

            csv_path, md_path = write_leaderboard(board, output_dir)
            print(board_markdown(board))
            print(f"\nwritten: {csv_path}, {md_path}, {output_dir / 'summary.csv'}; MLflow store: {tracker.uri}")
        else:
            print(summary_markdown(table))
    failed = [r for r in results if r.get("status") != "finished"]
    if failed:
        print(f"{len(failed)} trial(s) failed; see {output_dir}/trials/<name>/result.json", file=sys.stderr)
        return 1
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main() with the user's errors as one `error:` line on stderr and exit code 2 (130 on Ctrl-C)."""
    try:
        return main(argv)
    except HarnessError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished trials are skipped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
