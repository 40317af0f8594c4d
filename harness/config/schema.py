"""Type and range of every option (benchmarks/recipes/defaults.yaml and the method recipes).

Declared below for the known keys; a key without an entry is checked against the type of its harness default
(so a new option added to defaults.yaml is validated without touching this file). YAML gives ints for `1` and
floats for `0.1` / `1.0e-3`: an int is accepted where a number is expected, a bool never is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from harness.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What an option accepts: `form` is how the error line says it (a callable when it lists a registry's
    names, read at check time: registries such as BACKBONES can grow), `accepts` the test."""

    form: str | Callable[[], str]
    accepts: Callable[[Any], bool]

    def describe(self) -> str:
        return self.form() if callable(self.form) else self.form


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None) -> Rule:
    return Rule("an integer" + (f" >= {lo}" if lo is not None else ""),
                lambda v: _is_int(v) and (lo is None or v >= lo))


def number(lo: float | None = None, hi: float | None = None, above: float | None = None) -> Rule:
    """A finite number; `lo`/`hi` inclusive bounds, `above` an exclusive lower bound."""
    if above is not None:
        form = f"a number > {above:g}"
    elif lo is not None and hi is not None:
        form = f"a number in [{lo:g}, {hi:g}]"
    else:
        form = "a number" + (f" >= {lo:g}" if lo is not None else "")
    return Rule(form, lambda v: _is_num(v) and (above is None or v > above) and (lo is None or v >= lo)
                and (hi is None or v <= hi))


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
AUTO_BOOL = Rule("auto, true or false", lambda v: isinstance(v, bool) or v == "auto")
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
ANY = Rule("anything", lambda v: True)


def choice(values: Iterable[Any] | Callable[[], Iterable[Any]]) -> Rule:
    """One of `values` (a callable: read at check time)."""
    get = values if callable(values) else (lambda v=tuple(values): v)
    return Rule(lambda: "one of " + " | ".join(map(str, get())), lambda v: isinstance(v, str) and v in get())


def int_list(lo: int = 0) -> Rule:
    return Rule(f"a list of integers >= {lo}, e.g. [60, 120]",
                lambda v: isinstance(v, list) and all(_is_int(x) and x >= lo for x in v))


def names(values: Iterable[str] | Callable[[], Iterable[str]]) -> Rule:
    """A name or a list of names, each one of `values`."""
    get = values if callable(values) else (lambda v=tuple(values): v)

    def accepts(v: Any) -> bool:
        items = [v] if isinstance(v, str) else v
        return isinstance(items, list) and all(isinstance(x, str) and x in get() for x in items)
    return Rule(lambda: "a name or a list of names from " + " | ".join(get()), accepts)


def optional(rule: Rule) -> Rule:
    return Rule(lambda: f"null or {rule.describe()}", lambda v: v is None or rule.accepts(v))


def one_of_rules(*rules: Rule) -> Rule:
    return Rule(lambda: " or ".join(r.describe() for r in rules), lambda v: any(r.accepts(v) for r in rules))


# ---- registries, read lazily (importing them pulls in torch / timm) ---------------------------------------
def _datasets() -> tuple[str, ...]:
    from harness.data.registry import DATASETS
    return tuple(DATASETS)


def _backbones() -> tuple[str, ...]:
    from harness.core.backbones import BACKBONES
    return tuple(sorted(BACKBONES))


def _normalizations() -> tuple[str, ...]:
    from harness.data.transforms import NORMALIZATIONS
    return NORMALIZATIONS


def _memory_modes() -> tuple[str, ...]:
    from harness.core.memory import MEMORY_MODES
    return MEMORY_MODES


def _shortcuts() -> tuple[str, ...]:
    from harness.core.backbones import SHORTCUTS
    return SHORTCUTS


def _selections() -> tuple[str, ...]:
    from harness.core.memory import SELECTIONS
    return SELECTIONS


def _augments() -> tuple[str, ...]:
    from harness.data.transforms import AUGMENTS
    return AUGMENTS


def _optimizers() -> tuple[str, ...]:
    import timm.optim
    return tuple(timm.optim.list_optimizers())


def _freeze_groups() -> tuple[str, ...]:
    from methods.dytox.model import FREEZE_GROUPS
    return FREEZE_GROUPS


def _kd_reductions() -> tuple[str, ...]:
    from methods.dytox.losses import KD_REDUCTIONS
    return KD_REDUCTIONS


DEVICE = Rule("auto | cpu | cuda | cuda:N",
              lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or
                                                (v.startswith("cuda:") and v[5:].isdigit())))
AMP = choice(("auto", "none", "off", "fp32", "fp16", "float16", "bf16", "bfloat16"))
SCHEDS = ("multistep", "cosine", "constant")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")     # Ray's placement group strategies
PROB = number(0, 1)
POS_INT, NONNEG_INT, POS_NUM, NONNEG_NUM = integer(1), integer(0), number(above=0), number(0)
MODES = names(("tr", "ft"))

SCHEMA: dict[str, Rule] = {
    # data and scenario
    "dataset": choice(_datasets), "data_path": optional(TEXT), "download": BOOL,
    "initial_increment": NONNEG_INT, "increment": one_of_rules(POS_INT, int_list(1)),
    "class_order": ANY,                       # checked as a class order (harness.run.preflight)
    "train_per_class": optional(POS_INT), "augment": choice(_augments), "repeated_aug": POS_INT,
    "image_size": optional(POS_INT),
    # memory
    "memory_size": optional(NONNEG_INT), "memory_per_class": optional(NONNEG_INT),
    "memory_selection": choice(_selections), "memory_mode": choice(_memory_modes), "memory_shards": POS_INT,
    "herding_transform": choice(("test", "train")),
    # fidelity switches (docs/METHODS.md): PyCIL's protocol, the original DyTox's behaviours
    "brightness_jitter": NONNEG_NUM, "normalize": choice(_normalizations), "resnet_shortcut": choice(_shortcuts),
    "weight_decay_1d": BOOL, "finetuning_shuffle": BOOL, "nme_flip": BOOL,
    # model
    "backbone": choice(_backbones), "backbone_width": optional(POS_INT),
    # main phase
    "opt": choice(_optimizers), "lr": POS_NUM, "incremental_lr": optional(POS_NUM),
    "batch_size": POS_INT, "incremental_batch_size": optional(POS_INT), "lr_reference_batch": optional(POS_NUM),
    "momentum": PROB, "weight_decay": NONNEG_NUM, "incremental_weight_decay": optional(NONNEG_NUM),
    "base_epochs": optional(POS_INT), "epochs": POS_INT, "sched": choice(SCHEDS),
    "milestones": int_list(1), "base_milestones": optional(int_list(1)), "gamma": POS_NUM,
    "warmup_epochs": NONNEG_INT, "warmup_lr": NONNEG_NUM, "min_lr": NONNEG_NUM,
    # balanced finetuning
    "finetuning_epochs": NONNEG_INT, "finetuning_lr": POS_NUM, "finetuning_batch_size": optional(POS_INT),
    "finetuning_opt": optional(choice(_optimizers)), "finetuning_sched": choice(SCHEDS),
    "finetuning_milestones": int_list(1),
    # evaluation and runtime
    "eval_batch_size": POS_INT, "seed": NONNEG_INT, "device": DEVICE, "amp": AMP, "num_workers": POS_INT,
    "cpus_per_worker": optional(POS_NUM), "gpus_per_worker": optional(NONNEG_NUM), "loader_workers": NONNEG_INT,
    "threads_per_worker": optional(POS_INT), "placement_strategy": choice(PLACEMENTS),
    "placement_timeout_s": POS_NUM, "progress_interval_s": NONNEG_NUM,
    "batched_augment": AUTO_BOOL, "channels_last": AUTO_BOOL, "compile": BOOL, "variant": optional(TEXT),
    "fault_at_task": optional(NONNEG_INT),
    # iCaRL, LwF
    "icarl_loss": choice(("kd", "bce")), "kd_temperature": POS_NUM, "lwf_lambda": NONNEG_NUM,
    # DER
    "aux_weight": NONNEG_NUM, "reuse_old_classifier": BOOL, "weight_align": BOOL, "decouple_epochs": NONNEG_INT,
    "decouple_lr": POS_NUM, "decouple_milestones": int_list(1), "decouple_gamma": POS_NUM,
    "decouple_weight_decay": optional(NONNEG_NUM), "decouple_batch_size": optional(POS_INT),
    "decouple_temperature": POS_NUM, "decouple_reset_classifier": BOOL,
    # DyTox
    "finetuning": choice(("balanced", "none")), "embed_dim": POS_INT, "depth": POS_INT, "num_heads": POS_INT,
    "patch_size": POS_INT, "local_up_to_layer": NONNEG_INT, "mlp_ratio": POS_NUM, "qkv_bias": BOOL, "drop": PROB,
    "drop_path": PROB, "attn_drop": PROB, "locality_strength": NONNEG_NUM, "fused_attention": BOOL,
    "fused_gpsa": BOOL, "batched_tokens": BOOL, "freeze_eval": BOOL, "bce_loss": BOOL, "auto_kd": BOOL,
    "kd_weight": NONNEG_NUM, "distillation_tau": POS_NUM, "kd_reduction": choice(_kd_reductions),
    "head_div": NONNEG_NUM, "head_div_mode": MODES, "freeze_task": names(_freeze_groups),
    "freeze_ft": names(_freeze_groups), "mixup": NONNEG_NUM, "cutmix": NONNEG_NUM, "mixup_prob": PROB,
    "mixup_switch_prob": PROB, "mixup_mode": choice(("batch", "pair", "elem")), "smoothing": PROB,
    "sam_rho": NONNEG_NUM, "sam_adaptive": BOOL, "sam_eta": NONNEG_NUM, "sam_skip_first": BOOL, "sam_mode": MODES,
}

# Keys the harness adds while composing a config, and suite bookkeeping: not user options.
INTERNAL_KEYS = {"method", "suite", "recipe_files", "options_files", "orders", "seeds", "output_dir", "name",
                 "description"}


def inferred_rule(default: Any) -> Rule:
    """The check of an option with no SCHEMA entry: the type of its default (null: anything)."""
    if isinstance(default, bool):
        return BOOL
    if _is_int(default):
        return integer()
    if isinstance(default, float):
        return number()
    if isinstance(default, str):
        return Rule("a string", lambda v: isinstance(v, str))
    if isinstance(default, list):
        return Rule("a list", lambda v: isinstance(v, list))
    if isinstance(default, dict):
        return Rule("a mapping", lambda v: isinstance(v, dict))
    return ANY


def rule_for(key: str, defaults: dict) -> Rule:
    return SCHEMA.get(key) or inferred_rule(defaults.get(key))


def check_options(config: dict, defaults: dict, origins: dict[str, str] | None = None) -> None:
    """ConfigError (one line) for the first option whose value has the wrong type or range."""
    origins = origins or {}
    for key, value in config.items():
        if key in INTERNAL_KEYS:
            continue
        rule = rule_for(key, defaults)
        if not rule.accepts(value):
            where = f" (from {origins[key]})" if key in origins else ""
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ConfigError(f"option {key}: {shown}{where} is not valid; expected {rule.describe()}")
