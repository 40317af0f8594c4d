"""Option composition and the one-line errors for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import load_yaml, resolve_config
from harness.errors import ConfigError
from harness.trials import expand_trials
from run_benchmark import apply_epochs

ROOT = Path(__file__).resolve().parents[1]


def test_layers_apply_in_order(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("lr: 0.5\nepochs: 3\n")
    b = tmp_path / "b.yaml"
    b.write_text("lr: 0.25\n")
    cfg = resolve_config("replay", "cifar10-mini", [str(a), str(b)], {"epochs": 7})
    assert cfg["lr"] == 0.25          # later file wins
    assert cfg["epochs"] == 7         # command line beats files (DyTox's main.py did the reverse)
    assert cfg["memory_selection"] == "random"   # from the method recipe
    assert cfg["memory_size"] == 200             # from the suite
    assert cfg["orders"] == ["natural", "seed1993"]


def test_unknown_option_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rat: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rat'"):
        resolve_config("replay", "cifar10-mini", [str(bad)])


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("lr: 0.1\nmilestones: [1, 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*broken.yaml line"):
        load_yaml(bad)


def test_yaml_tags_are_not_executed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("lr: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_yaml(evil)


@pytest.mark.parametrize("method,suite,match", [("nope", "cifar10-mini", "unknown method 'nope'"),
                                                ("replay", "nope", "unknown suite 'nope'")])
def test_unknown_method_or_suite(method, suite, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(method, suite)


def test_global_batch_must_split_across_workers():
    with pytest.raises(ConfigError, match="divisible by num_workers"):
        resolve_config("replay", "cifar10-mini", overrides={"batch_size": 63, "num_workers": 2})


def test_trial_names_are_deterministic_and_depend_on_options():
    cfg = resolve_config("replay", "cifar10-mini")
    names = [s["name"] for s in expand_trials(cfg)]
    assert names == [s["name"] for s in expand_trials(resolve_config("replay", "cifar10-mini"))]
    assert len(set(names)) == 2 and all("seed0" in n for n in names)
    other = [s["name"] for s in expand_trials(resolve_config("replay", "cifar10-mini", overrides={"lr": 0.01}))]
    assert set(other).isdisjoint(names)


def test_explicit_class_order_replaces_suite_orders(tmp_path):
    order = tmp_path / "order.yaml"
    order.write_text("class_order: [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]\n")
    cfg = resolve_config("replay", "cifar10-mini", [str(order)])
    assert cfg["orders"] == [[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]


def test_epochs_flag_rescales_milestones():
    cfg = {"epochs": 170, "base_epochs": 200, "milestones": [80, 120], "base_milestones": [60, 120, 170],
           "warmup_epochs": 5}
    apply_epochs(cfg, 10)
    assert cfg["epochs"] == 10 and cfg["base_epochs"] == 10
    assert cfg["milestones"] == [5, 7] and cfg["base_milestones"] == [3, 6, 8]
    assert cfg["warmup_epochs"] == 5


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "run_benchmark.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_cli_lists_and_rejects_bad_input_in_one_line():
    out = _cli("--list-methods")
    assert out.returncode == 0 and "replay" in out.stdout and "finetune" in out.stdout
    out = _cli("--list-suites")
    assert out.returncode == 0 and "cifar100" in out.stdout and "cifar10-mini" in out.stdout
    out = _cli("--method", "nope", "--suite", "cifar10-mini")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: unknown method 'nope'; available: "
                                               + out.stderr.split("available: ")[1].strip()]
