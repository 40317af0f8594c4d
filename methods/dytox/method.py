"""DyTox, DyTox+ and DyTox++ (Douillard et al., CVPR 2022) on the harness's loop, memory and metrics.

One method, `dytox`; the variants are option presets (benchmarks/recipes/dytox/plus.yaml, plusplus.yaml, or the
original option files cifar_dytox_plus.yaml / cifar_dytox_plusplus.yaml through --options):
- DyTox:   sigmoid-BCE over all seen classes + auto-weighted KD on the old logits + divergence head (0.1);
- DyTox+:  + MixUp (alpha 0.8, label smoothing 0.1, one lambda per batch), soft BCE, also during finetuning;
- DyTox++: + ASAM (rho 3.0, adaptive) in the main phase of every task but the first.

Per task t (dytox.md 1.2, 2.1): the teacher is a frozen copy of the model as it ended task t-1; the model
grows one task token, one head and a fresh divergence head; main phase with old tokens and old heads frozen
(`freeze_task`); the harness herds the memory on the concatenated task embeddings (test transform); from the
second task on a balanced finetuning phase on the memory only with the encoder frozen (`freeze_ft`) -- which
also makes the old tokens and heads trainable again, as the original's freeze() does -- no KD, no divergence.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from timm.data.mixup import Mixup, mixup_target

from harness.errors import ConfigError
from harness.core.method import Method, PhaseConfig, PhaseKind, TaskInfo
from harness.core.registry import register_method
from methods.dytox.losses import KD_REDUCTIONS, dytox_loss, hard_targets
from methods.dytox.model import FREEZE_GROUPS, DyTox, DyToxConfig, count_parameters
from methods.dytox.sam import SAM

HEAD_DIV_MODES = ("tr", "ft")      # tr: main phase, ft: finetuning phase
SAM_MODES = ("tr", "ft")

# Flat option keys -> DyToxConfig (the original yaml names; DyToxConfig.ALIASES maps drop/drop_path/...).
MODEL_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "local_up_to_layer", "mlp_ratio", "qkv_bias",
              "drop", "drop_path", "attn_drop", "locality_strength", "head_div", "fused_attention", "fused_gpsa",
              "batched_tokens", "freeze_eval")


# ---- original option files -> harness options -----------------------------------------------------------
def _as_list(value: Any) -> list:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def _dataset(value: Any) -> Any:
    """Original `data_set` values (continuum names in datasets.py) -> the harness's dataset names."""
    from harness.data import DATASETS

    mapping = {"cifar": "cifar100", "cifar100": "cifar100", "imagenet100": "imagenet100",
               "imagenet1000": "imagenet1000", "imagenet": "imagenet1000"}
    key = str(value).lower()
    if key in mapping:
        return mapping[key]
    if value in DATASETS:
        return value
    raise ConfigError(f"data_set {value!r} is not one of DyTox's datasets (CIFAR, ImageNet100, ImageNet1000) "
                      f"nor a harness dataset ({', '.join(DATASETS)})")


def _augment(value: Any) -> str:
    """Original `aa` (timm auto-augment string) -> harness `augment`."""
    from harness.data.transforms import RAND_AUGMENT

    if value in (None, "", "none", "None", False):
        return "standard"
    if str(value) == RAND_AUGMENT:          # timm's transform of exactly this string (harness.data.transforms)
        return "randaugment"
    raise ConfigError(f"aa {value!r}: only DyTox's {RAND_AUGMENT!r} (augment: randaugment) or none "
                      "(augment: standard) are implemented")


def _selection(value: Any) -> str:
    """Original `rehearsal` -> harness `memory_selection` (the original's typo sent unknown values to herding;
    here they are an error). Random selection draws without replacement (the original drew with)."""
    mapping = {"icarl_all": "herding", "icarl": "herding", "random": "random", "closest_all": "closest",
               "closest": "closest"}
    if value in mapping:
        return mapping[value]
    raise ConfigError(f"rehearsal {value!r} is not implemented; use icarl_all (herding), closest_all or random")


def _repeated_aug(value: Any) -> int:
    """Original `repeated_aug` is a switch (x3 when on); ours is the repetition factor."""
    if isinstance(value, bool):
        return 3 if value else 1
    return value


def _only(key: str, *allowed: Any, why: str = "") -> Callable[[Any], Any]:
    """Value map for an original option accepted only with the value this implementation has."""
    def check(value: Any) -> Any:
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not supported ({why or 'only ' + ' / '.join(map(repr, allowed))})")
        return value
    return check


def _head_div_mode(value: Any) -> list[str]:
    return [str(v) for v in _as_list(value)]


def _finetuning(value: Any) -> str:
    if value in (None, "", False, "none", "None"):
        return "none"
    if value == "balanced":
        return "balanced"
    raise ConfigError(f"finetuning {value!r}: only 'balanced' (on the memory) or none are implemented")


IGNORED = (
    # bookkeeping of the original main.py that the harness does itself (tracking, paths, eval schedule)
    "name", "log_category", "log_dir", "log_path", "output_basedir", "output_dir", "save_every_epoch",
    "eval_every", "resume", "start_task", "dist_eval", "pin_mem", "dist_url", "world_size", "local_rank",
    "validation", "dytox",
    # memory placement: the harness memory is one global memory, selected once (see docs/METHODS.md)
    "distributed_memory", "global_memory", "rehearsal_test_trsf",
    # finetuning loader: `finetuning_shuffle: false` is the original's ft_no_sampling (the memory class-sorted)
    "ft_no_sampling",
    # augmentation details timm ignored with RandAugment on, or that only matter with random erasing
    "color_jitter", "train_interpolation", "remode", "recount", "resplit",
    # the step-scheduler options of timm; DyTox uses cosine
    "decay_epochs", "decay_rate", "cooldown_epochs", "patience_epochs",
    # DeiT hard-distillation from an external teacher, unused by DyTox (distillation_type must be none)
    "teacher_model", "teacher_path", "distillation_alpha",
)

RESTRICTED: dict[str, tuple[tuple, str]] = {
    "model": (("convit",), "DyTox's encoder here is ConViT (GPSA)"),
    "class_attention": ((True,), "the TAB is a class-attention block"),
    "norm": (("layer",), "LayerNorm only"),
    "ind_clf": (("1-1",), "one independent classifier per task token only"),
    "joint_tokens": ((False,), "the TAB runs each token separately (batched, same maths)"),
    "reprob": ((0, 0.0, None), "random erasing is not implemented"),
    "clip_grad": ((None,), "no gradient clipping, as the original"),
    "opt_eps": ((None, 1e-8), "AdamW's eps is timm's default 1e-8"),
    "opt_betas": ((None,), "AdamW's betas are timm's defaults"),
    "oversample_memory": ((1, None), "the memory is added once"),
    "fixed_memory": ((False, None), "memory_size is a total budget; use memory_per_class for a fixed one"),
    "finetuning_resetclf": ((False, None), "heads are kept for finetuning"),
    "finetuning_teacher": ((False, None), "no KD during finetuning"),
    "sep_memory": ((False, None), "memory samples are merged into the task data"),
    "distillation_type": (("none", None), "only DyTox's own KD"),
    "pod": ((None, False, 0, 0.0), "POD distillation is not implemented"),
    "resnet": ((False, None), "the ResNet encoder option is not implemented"),
    "lr_noise": ((None,), "no lr noise"),
}


def _alias_tables() -> tuple[dict[str, str | None], dict[str, Callable[[Any], Any]]]:
    aliases: dict[str, str | None] = {k: None for k in IGNORED}
    aliases.update({k: None for k in RESTRICTED})
    aliases.update({"data_set": "dataset", "input_size": "image_size", "no_amp": "amp", "aa": "augment",
                    "rehearsal": "memory_selection"})
    maps: dict[str, Callable[[Any], Any]] = {k: _only(k, *allowed, why=why) for k, (allowed, why) in RESTRICTED.items()}
    maps.update({"data_set": _dataset, "no_amp": lambda v: "none" if v else "auto", "aa": _augment,
                 "rehearsal": _selection, "repeated_aug": _repeated_aug, "head_div_mode": _head_div_mode,
                 "sam_mode": _head_div_mode, "finetuning": _finetuning})
    return aliases, maps


# ---- MixUp ----------------------------------------------------------------------------------------------
class BatchMixup:
    """timm's Mixup over the seen classes (DyTox+: alpha 0.8, `mode: batch`, prob 1, label smoothing 0.1).

    timm needs an even batch; an odd per-worker batch mixes its first B-1 samples and gives the last one its
    smoothed one-hot target. The input is cloned (timm mixes in place) and the result is kept for the batch it
    was made from, so SAM's second forward pass sees the same mixed images and targets as the first."""

    def __init__(self, config: dict) -> None:
        self.kwargs = dict(mixup_alpha=float(config.get("mixup") or 0.0), cutmix_alpha=float(config.get("cutmix") or 0.0),
                           cutmix_minmax=config.get("cutmix_minmax"), prob=float(config.get("mixup_prob", 1.0)),
                           switch_prob=float(config.get("mixup_switch_prob", 0.5)),
                           mode=config.get("mixup_mode", "batch"), label_smoothing=float(config.get("smoothing", 0.1)))
        self.active = self.kwargs["mixup_alpha"] > 0 or self.kwargs["cutmix_alpha"] > 0 or \
            self.kwargs["cutmix_minmax"] is not None
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._last is not None and self._last[0] is x and self._last[3] == num_classes:
            return self._last[1], self._last[2]
        mixer = Mixup(num_classes=num_classes, **self.kwargs)
        mixed = x.clone()
        n = len(x) - len(x) % 2
        targets = []
        if n:
            _, t = mixer(mixed[:n], y[:n])          # mixes the view in place
            targets.append(t)
        if n < len(x):
            targets.append(mixup_target(y[n:], num_classes, 1.0, self.kwargs["label_smoothing"]))
        soft = torch.cat(targets).float()
        self._last = (x, mixed, soft, num_classes)   # holding x keeps its id unique while cached
        return mixed, soft

    def clear(self) -> None:
        self._last = None


# ---- the method -----------------------------------------------------------------------------------------
def model_config(config: dict) -> DyToxConfig:
    """DyToxConfig from the flat options; the image size is `image_size`, else the dataset's own."""
    options = {k: config[k] for k in MODEL_KEYS if config.get(k) is not None}
    size = config.get("image_size")
    if size is None and config.get("dataset"):
        from harness.data import dataset_info

        size = dataset_info(config["dataset"], config.get("data_path")).image_size or 224
    if size:
        options["img_size"] = int(size)
    return DyToxConfig.from_options(options)


@register_method("dytox")
class DyToxMethod(Method):
    """DyTox / DyTox+ / DyTox++ (transformer, task tokens); variants are option presets (see docs/METHODS.md)."""

    balanced_phase = PhaseKind.FINETUNE      # options finetuning_*; `finetuning: none` turns it off
    option_aliases, option_value_maps = _alias_tables()

    def build(self) -> None:
        c = self.config
        self._validate(c)
        if self.device.type == "meta":       # shapes only (parameter counts): no memory, no init time
            with torch.device("meta"):
                self.model = DyTox(model_config(c))
        else:                                # initialised on the CPU: the same weights whatever the device
            self.model = DyTox(model_config(c)).to(self.device)
        self.teacher: DyTox | None = None
        self.mixup = BatchMixup(c)
        self.freeze_task = _as_list(c.get("freeze_task", ["old_task_tokens", "old_heads"]))
        self.freeze_ft = _as_list(c.get("freeze_ft", ["sab"]))
        self.head_div = float(c.get("head_div") or 0.0)
        self.head_div_mode = _head_div_mode(c.get("head_div_mode", ["tr"]))
        self.last_losses: dict[str, torch.Tensor] = {}

    @staticmethod
    def _validate(c: dict) -> None:
        for key in ("freeze_task", "freeze_ft"):
            bad = [n for n in _as_list(c.get(key)) if n not in FREEZE_GROUPS]
            if bad:
                raise ConfigError(f"{key}: unknown freeze group(s) {bad}; use some of {', '.join(FREEZE_GROUPS)}")
        for key, allowed in (("head_div_mode", HEAD_DIV_MODES), ("sam_mode", SAM_MODES)):
            bad = [m for m in _head_div_mode(c.get(key)) if m not in allowed]
            if bad:
                raise ConfigError(f"{key}: unknown mode(s) {bad}; use some of {', '.join(allowed)}")
        if c.get("kd_reduction", "mean") not in KD_REDUCTIONS:
            raise ConfigError(f"kd_reduction must be one of {', '.join(KD_REDUCTIONS)}, got {c.get('kd_reduction')!r}")
        if float(c.get("distillation_tau", 1.0)) <= 0:
            raise ConfigError(f"distillation_tau must be > 0, got {c.get('distillation_tau')!r}")
        if float(c.get("sam_rho") or 0.0) > 0 and c.get("amp") in ("fp16", "float16"):
            raise ConfigError("sam_rho > 0 (DyTox++) with amp: fp16 is not supported (the SAM step has no loss "
                              "scaling); use amp: bf16 or amp: none (the original ran SAM in fp32)")
        _finetuning(c.get("finetuning", "balanced"))

    # ---- growth and freezing --------------------------------------------------------------------------
    def _freeze_main(self, task: TaskInfo) -> None:
        self.model.freeze(self.freeze_task if task.task_id > 0 else [])

    def _freeze_finetune(self) -> None:
        names = list(self.freeze_ft)
        if "ft" not in self.head_div_mode and "div_head" not in names:
            names.append("div_head")          # no divergence loss in finetuning: nothing should update it
        self.model.freeze(names)

    def before_task(self, task: TaskInfo) -> None:
        # The teacher is the model as it ended the previous task (after its finetuning), copied BEFORE growing.
        # On resume this runs on not-yet-loaded weights, but only the next task's copy is ever used.
        self.teacher = None
        if task.task_id > 0 and self.model.num_tasks > 0:
            teacher = copy.deepcopy(self.model)
            teacher.freeze(["all"])           # no gradients; stays in eval under train()
            self.teacher = teacher
        self.model.add_task(task.num_new_classes)
        self._freeze_main(task)
        self.mixup.clear()

    def after_task(self, task: TaskInfo) -> None:
        self.teacher = None                   # KD only in the main phase: free its memory before finetuning

    def before_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.FINETUNE:
            self._freeze_finetune()
        else:
            self._freeze_main(task)
        self.mixup.clear()

    def after_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.FINETUNE:
            self._freeze_main(task)           # the state before_task leaves (what a resumed trial replays)
        self.mixup.clear()

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, phase: PhaseConfig, task: TaskInfo):
        """DyTox++: ASAM in the phases of `sam_mode` (main phase only by default), not on the first task when
        `sam_skip_first`."""
        c = self.config
        rho = float(c.get("sam_rho") or 0.0)
        mode = "ft" if phase.kind is PhaseKind.FINETUNE else "tr"
        if rho <= 0 or mode not in _head_div_mode(c.get("sam_mode", ["tr"])):
            return optimizer
        if c.get("sam_skip_first") and task.task_id == 0:
            return optimizer
        return SAM(optimizer, rho=rho, adaptive=bool(c.get("sam_adaptive")), eta=float(c.get("sam_eta") or 0.0))

    # ---- training -------------------------------------------------------------------------------------
    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        c = self.config
        finetune = phase.kind is PhaseKind.FINETUNE
        num_seen = self.model.num_classes
        if self.mixup.active:
            x, targets = self.mixup(x, y, num_seen)
        else:
            targets = hard_targets(y, num_seen)
        use_div = (self.head_div > 0 and self.model.div_head is not None
                   and ("ft" if finetune else "tr") in self.head_div_mode)
        out = self.net(x, with_div=use_div)
        teacher_logits = None
        if self.teacher is not None and not finetune:
            with torch.no_grad():
                teacher_logits = self.teacher(x, with_div=False)["logits"]
        losses = dytox_loss(
            out["logits"], targets, num_old=task.num_old_classes, teacher_logits=teacher_logits,
            div_logits=out["div_logits"], head_div=self.head_div, auto_kd=bool(c.get("auto_kd", True)),
            kd_weight=float(c.get("kd_weight", 1.0)), tau=float(c.get("distillation_tau", 1.0)),
            kd_reduction=c.get("kd_reduction", "mean"), bce=bool(c.get("bce_loss", True)))
        # detached tensors, not floats: a float() here would synchronise the GPU every step
        self.last_losses = {k: v for k, v in losses.items() if k != "loss"}
        return losses["loss"]

    # ---- inference ------------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # The divergence head is training-only: never part of the prediction.
        return {"cnn": self.model(x, with_div=False)["logits"]}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated task embeddings [e_1 .. e_t] (what the original herds on)."""
        return self.model.forward_features(x)

    def parameter_count(self) -> int:
        """Inference parameters (the paper's #P): without the training-only divergence head."""
        return count_parameters(self.model)
