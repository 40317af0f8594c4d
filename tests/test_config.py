"""Option composition and the one-line errors for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config.compose import load_yaml, resolve_config
from harness.errors import ConfigError
from harness.config.identity import expand_trials
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
    with pytest.raises(ConfigError, match="unknown option 'learning_rat'") as err:
        resolve_config("replay", "cifar10-mini", [str(bad)])
    assert "\n" not in str(err.value)
    assert str(err.value).endswith("declare one in benchmarks/recipes/replay/default.yaml")   # where the rule lives


def test_a_method_option_is_accepted_for_that_method_only():
    """iCaRL's recipe declares kd_temperature; the same key for replay, whose recipe does not, is an error."""
    assert resolve_config("icarl", "digits-5x2", overrides={"kd_temperature": 3.0})["kd_temperature"] == 3.0
    with pytest.raises(ConfigError, match="unknown option 'kd_temperature' in command line"):
        resolve_config("replay", "digits-5x2", overrides={"kd_temperature": 3.0})


def test_one_memory_decision_for_every_method():
    from harness.config.catalog import get_method
    from harness.config.memory import MemoryBudget, memory_budget

    replay, finetune, icarl = (get_method(m) for m in ("replay", "finetune", "icarl"))
    assert memory_budget({"memory_size": 100}, replay) == MemoryBudget(size=100)
    assert memory_budget({"memory_size": 0, "memory_per_class": 5}, replay) == MemoryBudget(per_class=5)
    assert memory_budget({"memory_size": 0, "memory_per_class": None}, replay) is None
    assert memory_budget({"memory_size": 100}, finetune) is None                # uses_memory = False
    with pytest.raises(ConfigError, match="not both"):
        memory_budget({"memory_size": 100, "memory_per_class": 5}, finetune)
    with pytest.raises(ConfigError, match="icarl needs a rehearsal memory"):
        memory_budget({"memory_size": 0}, icarl)
    assert MemoryBudget(size=100).capacity(4) == 100 and MemoryBudget(per_class=5).capacity(4) == 20


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


# ---- the option schema (harness.config.schema) and the pre-flight's scenario checks ----------------------------
def test_every_shipped_suite_method_and_recipe_passes_the_schema():
    """A schema entry that is too strict would reject a shipped recipe: every combination is checked."""
    from harness.config.compose import compose_config, list_suites
    from harness.run.preflight import check_config, check_scenario
    from harness.config.catalog import list_methods

    from harness.config.compose import load_suite

    for suite in list_suites():
        suite_cfg = load_suite(suite)
        for method in list_methods():
            recipes = sorted(p.stem for p in (ROOT / "benchmarks" / "recipes" / method).glob("*.yaml"))
            for recipe in [None, *recipes]:
                if recipe is None and suite_cfg.get("recipe") not in (None, *recipes) \
                        and suite_cfg.get("recipe_fallback") is None:
                    with pytest.raises(ConfigError, match=f"^{method} cannot run on suite {suite}: it has no"):
                        compose_config(method, suite)
                    continue
                config, origins = compose_config(method, suite, recipe=recipe)
                check_config(config, origins)
                check_scenario(config)


def test_a_suites_recipe_must_exist_for_the_method_unless_the_suite_falls_back_to_default(tmp_path):
    """The CPU and ImageNet suites' recipes carry their budget: a method without one would silently run its full
    paper recipe, so it is refused, in `--method` and `table` alike. The CIFAR-100 suites fall back to the method's
    default.yaml (its paper's CIFAR-100 recipe)."""
    from harness.config.compose import compose_config

    config, _ = compose_config("ucir", "cifar100")          # no ucir/cifar100.yaml: the paper's default
    assert config["recipe_files"] == ["benchmarks/recipes/ucir/default.yaml"]
    assert compose_config("icarl", "cifar100")[0]["recipe_files"][-1] == "benchmarks/recipes/icarl/cifar100.yaml"
    with pytest.raises(ConfigError, match="^finetune cannot run on suite imagenet100: it has no 'imagenet' recipe"):
        compose_config("finetune", "imagenet100")
    assert compose_config("finetune", "imagenet100", recipe="default")[0]["recipe_files"] == \
        ["benchmarks/recipes/finetune/default.yaml"]                     # asked for by name: allowed
    suite = tmp_path / "s.yaml"
    suite.write_text((ROOT / "benchmarks" / "suites" / "cifar100.yaml").read_text().replace(
        "recipe_fallback: default", "recipe_fallback: cpu"))
    with pytest.raises(ConfigError, match="recipe_fallback must be `default` or absent, got 'cpu'"):
        compose_config("ucir", str(suite))


def test_schema_types_follow_yaml():
    from harness.config.schema import check_options

    defaults = {"lr": 0.1, "epochs": 1}
    check_options({"lr": 1, "epochs": 3}, defaults)                 # an int where a number is expected is fine
    for bad in ({"epochs": True}, {"epochs": 2.0}, {"lr": False}, {"lr": "0.1"}, {"lr": float("inf")}):
        with pytest.raises(ConfigError, match=f"option {next(iter(bad))}: "):
            check_options(bad, defaults)


def test_a_new_option_without_a_schema_entry_is_checked_against_its_default():
    """Others add keys to defaults.yaml: the type of the default value is the check until an entry exists."""
    from harness.config.schema import SCHEMA, check_options

    defaults = {"brand_new_interval_s": 30, "brand_new_mode": "fast", "brand_new_flag": False, "brand_new_any": None}
    assert not set(defaults) & set(SCHEMA)
    check_options({"brand_new_interval_s": 5, "brand_new_mode": "slow", "brand_new_flag": True,
                   "brand_new_any": [1, "x"]}, defaults)
    for key, value in (("brand_new_interval_s", "soon"), ("brand_new_mode", 3), ("brand_new_flag", "yes")):
        with pytest.raises(ConfigError, match=f"option {key}: {value!r} \\(from x.yaml\\)"):
            check_options({key: value}, defaults, {key: "x.yaml"})


def test_error_line_names_the_file_the_value_came_from(tmp_path):
    from harness.config.compose import compose_config
    from harness.run.preflight import check_config

    opts = tmp_path / "mine.yaml"
    opts.write_text("momentum: [0.9]\n")
    config, origins = compose_config("replay", "digits-5x2", [str(opts)])
    with pytest.raises(ConfigError) as err:
        check_config(config, origins)
    assert str(err.value) == (f"option momentum: [0.9] (from {opts}) is not valid; expected a number in [0, 1]")


def test_orders_and_seeds_must_be_distinct():
    from harness.config.compose import compose_config
    from harness.run.preflight import check_scenario

    config, _ = compose_config("replay", "digits-5x2", overrides={"orders": ["natural", "seed3"], "seeds": [0, 7]})
    assert len(check_scenario(config)) == 2
    config["orders"] = ["natural", list(range(10))]
    with pytest.raises(ConfigError, match=r"\[0, 1, 2, .* is the same permutation as 'natural'"):
        check_scenario(config)
    config["orders"], config["seeds"] = ["natural"], [7, 7]
    with pytest.raises(ConfigError, match="seed 7 is listed more than once"):
        check_scenario(config)


def test_a_method_option_without_a_schema_entry_is_checked_against_the_method_default(tmp_path, monkeypatch):
    """A key a method recipe adds (not in defaults.yaml, no schema entry) is checked against the recipe's value."""
    import shutil

    import harness.config.compose
    from harness.config.compose import compose_config
    from harness.run.preflight import check_config

    recipes = tmp_path / "recipes"
    shutil.copytree(ROOT / "benchmarks" / "recipes", recipes)
    with open(recipes / "der" / "default.yaml", "a") as f:
        f.write("\nbrand_new_der_weight: 0.5\n")
    monkeypatch.setattr(harness.config.compose, "RECIPES_DIR", recipes)
    monkeypatch.setattr(harness.config.compose, "ROOT", tmp_path)      # recipe files are named relative to it
    opts = tmp_path / "o.yaml"
    opts.write_text("brand_new_der_weight: [not, a, number]\n")
    config, origins = compose_config("der", "digits-5x2", [str(opts)])
    with pytest.raises(ConfigError, match="option brand_new_der_weight: .* expected a number"):
        check_config(config, origins)
    opts.write_text("brand_new_der_weight: 2\n")
    check_config(*compose_config("der", "digits-5x2", [str(opts)]))
