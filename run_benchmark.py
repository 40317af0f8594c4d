#!/usr/bin/env python
"""Class-incremental continual-learning benchmark harness.

  python run_benchmark.py --method icarl --suite cifar100            # every order x seed of the suite
  python run_benchmark.py --method dytox --suite cifar10-mini --epochs 2
  python run_benchmark.py --list-methods | --list-suites
  python run_benchmark.py report --output-dir results              # leaderboard from an MLflow store
  python run_benchmark.py sweep --method icarl --suite cifar10-5x2 --space benchmarks/sweeps/icarl.yaml
  python run_benchmark.py table --suite cifar100 --methods icarl ucir bic wa podnet der dytox

Options resolve as: harness defaults < suite < method recipe < --options files (in order) < flags.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from harness.errors import ConfigError, HarnessError, ResourceError  # noqa: E402
# Cheap to import: what every command, --help and a bad input's one error line need. Torch, pandas, MLflow and Ray
# (the launchers, trackers and tables) are imported by the commands that use them, so that `--list-suites`,
# `report --help` or a typo answer in well under a second.
from harness.config.catalog import get_method, list_methods  # noqa: E402
from harness.config.compose import (compose_config, list_suites, load_suite,  # noqa: E402
                                     parse_overrides)
from harness.run.cluster import preflight_cluster  # noqa: E402
from harness.run.preflight import OneLineParser, preflight  # noqa: E402

if TYPE_CHECKING:
    from harness.run.events import LaunchOptions
    from harness.tracking.trackers import BenchmarkTracker

TABLE_DOC = """The paper-style comparison of several methods on one suite, as ONE grid of trials.

  python run_benchmark.py table --suite cifar100 --methods icarl ucir bic wa podnet der dytox
  python run_benchmark.py table --suite cifar10-5x2 --methods finetune replay icarl der --reference icarl

Every method runs every class order x seed of the suite (trials of different methods share the cluster at the
same time; finished trials are skipped on a rerun). The table gives each method's average incremental and last
accuracy (mean +- std), parameters, compute, the published number of the same protocol and the difference to it,
and the paired difference to --reference over the same orders and seeds with a 95% interval; it is written as
table_<suite>.csv/.md and table_<suite>_curves.png in --output-dir.
"""


def build_parser(table: bool = False) -> argparse.ArgumentParser:
    """The benchmark's flags; `table`: the `table` command's (several --methods and a --reference instead of
    --method)."""
    p = OneLineParser(
        prog="run_benchmark.py table" if table else "run_benchmark.py", description=TABLE_DOC if table else __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if table:
        p.add_argument("--methods", nargs="+", required=True, metavar="METHOD",
                       help="registered methods, in the table's order (see --list-methods)")
        p.add_argument("--reference", help="the method the paired differences are taken against (default: the "
                                           "first of --methods)")
    else:
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
    if not table:
        p.add_argument("--list-methods", action="store_true", help="list registered methods and exit")
        p.add_argument("--list-suites", action="store_true", help="list suites and exit")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict:
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
    if argv and argv[0] == "table":     # several methods as one grid, the paper-style table
        return table_main(argv[1:])
    if argv and argv[0] in ("report", "leaderboard"):   # leaderboard from any MLflow store (docs/TRACKING.md)
        from harness.tracking.report import main as report_main

        return report_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.list_methods:
        for name in list_methods():
            doc = (get_method(name).__doc__ or "").strip().splitlines()
            print(f"{name:12s} {doc[0] if doc else ''}")
        return 0
    if args.list_suites:
        for name in list_suites():
            print(f"{name:24s} {load_suite(name).get('description', '')}")
        return 0
    if not args.method or not args.suite:
        raise ConfigError("--method and --suite are required (see --list-methods, --list-suites)")

    from harness.config.identity import expand_trials, fix_identity
    from harness.run.launch import resolve_threads
    from harness.run.results import summary_markdown, summary_table
    from harness.tracking.report import to_markdown as board_markdown, write_leaderboard

    # Pre-flight: every check of the input before anything is written (no output folder, MLflow store or Ray).
    check_flags(args)
    config, output_dir = prepare_config(args, args.method)
    if args.launcher == "ray":   # on a cluster: join it, check shared folders and state API on every node
        preflight_cluster(args.address, output_dir, config.get("data_path"),
                          None if args.no_tracking else args.tracking_uri, bool(config.get("download")), args.verbose)
    options = launch_options(args)
    # What changes the numbers without being an option (the data read, threads per worker) joins the trial names.
    fix_identity(config, resolve_threads(config, options, len(config["orders"]) * len(config["seeds"])))
    specs = expand_trials(config)
    print(f"{len(specs)} trial(s): {args.method} on {config['suite']} "
          f"(orders {', '.join(s['order_name'] for s in specs[::len(config['seeds'])])}; seeds {config['seeds']}) "
          f"-> {output_dir}")
    with os_errors_as_one_line(output_dir):
        trackers = open_trackers(args, output_dir, {args.method: (config, specs)})
        results = launch_all(args, specs, output_dir, options, trackers)
        table = summary_table(results)
        output_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(output_dir / "summary.csv", index=False)
        (output_dir / "summary.md").write_text(summary_markdown(table) + "\n")
        tracker = trackers.get(args.method)
        board = tracker.end_benchmark(results, specs) if tracker is not None else None
        print()
        if board is not None and not board.empty:
            csv_path, md_path = write_leaderboard(board, output_dir)
            print(board_markdown(board))
            print(f"\nwritten: {csv_path}, {md_path}, {output_dir / 'summary.csv'}; MLflow store: {tracker.uri}")
        else:
            print(summary_markdown(table))
    return exit_status(results, output_dir)


def table_main(argv: list[str]) -> int:
    """`run_benchmark.py table`: several methods on one suite as ONE grid, and the paper-style table."""
    args = build_parser(table=True).parse_args(argv)
    from harness.config.identity import expand_trials, fix_identity
    from harness.run.launch import resolve_threads
    from harness.tracking.comparison import PAIRED_NOTE, comparison_markdown, comparison_table, write_comparison
    from harness.tracking.report import load_published

    check_flags(args)
    methods = list(args.methods)
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {' '.join(methods)}")
    reference = args.reference or methods[0]
    if reference not in methods:
        raise ConfigError(f"--reference {reference} is not one of --methods ({' '.join(methods)}): add it to the list")
    for m in methods:
        get_method(m)                          # an unknown name: one line before anything else
    # every method checked before anything starts (a method without the suite's recipe: compose's one line)
    prepared = {m: prepare_config(args, m) for m in methods}
    output_dir = prepared[methods[0]][1]
    grids = {m: (tuple(map(str, c["orders"])), tuple(c["seeds"])) for m, (c, _) in prepared.items()}
    if len(set(grids.values())) > 1:
        raise ConfigError("the methods would run different class orders or seeds (a recipe or --options file sets "
                          "them): give --orders and --seeds so that every method runs the same trials")
    first = prepared[methods[0]][0]
    if args.launcher == "ray":
        preflight_cluster(args.address, output_dir, first.get("data_path"),
                          None if args.no_tracking else args.tracking_uri, bool(first.get("download")), args.verbose)
    options = launch_options(args)
    total = len(methods) * len(first["orders"]) * len(first["seeds"])
    per_method = {}
    for m, (config, _) in prepared.items():
        fix_identity(config, resolve_threads(config, options, total))
        per_method[m] = (config, expand_trials(config))
    specs = [s for m in methods for s in per_method[m][1]]
    print(f"{len(specs)} trial(s): {', '.join(methods)} on {first['suite']} (orders "
          f"{', '.join(map(str, first['orders']))}; seeds {first['seeds']}) as one grid -> {output_dir}")
    with os_errors_as_one_line(output_dir):
        trackers = open_trackers(args, output_dir, per_method)
        results = launch_all(args, specs, output_dir, options, trackers)
        for m, tracker in trackers.items():
            tracker.end_benchmark([r for r in results if r.get("method") == m], per_method[m][1])
        table = comparison_table(results, methods, reference, load_published())
        written = write_comparison(table, results, output_dir, name=f"table_{first['suite']}")
        print()
        print(comparison_markdown(table))
        print(PAIRED_NOTE)
        print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return exit_status(results, output_dir)


def prepare_config(args: argparse.Namespace, method: str) -> tuple[dict, Path]:
    """One method's options from the flags, checked (pre-flight) before anything is written."""
    config, origins = compose_config(method, args.suite, args.options, overrides_from_args(args), args.recipe)
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
    return config, output_dir


def launch_options(args: argparse.Namespace) -> LaunchOptions:
    from harness.run.events import LaunchOptions

    return LaunchOptions(launcher=args.launcher, address=args.address, max_concurrent_trials=args.max_concurrent_trials,
                         max_failures=args.max_failures, verbose=args.verbose)


def open_trackers(args: argparse.Namespace, output_dir: Path,
                  per_method: dict[str, tuple[dict, list[dict]]]) -> dict[str, BenchmarkTracker]:
    """One MLflow parent run per method (the store was checked in pre-flight; this creates it)."""
    if args.no_tracking:
        return {}
    from harness.tracking.trackers import BenchmarkTracker

    return {m: BenchmarkTracker.for_benchmark(args.tracking_uri, output_dir, config, specs, experiment=args.experiment)
            for m, (config, specs) in per_method.items()}


class MethodTrackers:
    """TrialEvents' tracker for a grid of several methods: each trial goes to its method's parent run."""

    def __init__(self, trackers: dict[str, BenchmarkTracker]) -> None:
        self.trackers = trackers

    def log_task(self, spec: dict, row: dict) -> None:
        self.trackers[spec["config"]["method"]].log_task(spec, row)

    def log_trial(self, spec: dict, result: dict) -> None:
        self.trackers[spec["config"]["method"]].log_trial(spec, result)


def launch_all(args: argparse.Namespace, specs: list[dict], output_dir: Path, options: LaunchOptions,
               trackers: dict[str, BenchmarkTracker]) -> list[dict]:
    from harness.run.events import TrialEvents
    from harness.run.launch import launch

    try:
        return launch(specs, output_dir, options, progress=not args.quiet and sys.stderr.isatty(),
                      events=TrialEvents(print, tracker=MethodTrackers(trackers) if trackers else None))
    except BaseException:
        for tracker in trackers.values():
            tracker.abort()       # the parent runs end KILLED/FAILED, not RUNNING forever; a rerun resumes them
        raise


def exit_status(results: list[dict], output_dir: Path) -> int:
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
