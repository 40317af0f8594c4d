"""DER: Dynamically Expandable Representation (Yan, Xie & He, CVPR 2021). Not Dark Experience Replay.

Each task adds a feature extractor initialised from the previous one; the old extractors are frozen (no
gradients, BatchNorm in eval mode even while the model trains). A linear classifier reads the concatenation of
all extractors' features; when it grows, the old classes' weights are copied into its top-left block
(`reuse_old_classifier`; DER's official configs start it afresh instead). An auxiliary classifier over the NEW
extractor's features only, with |new| + 1 outputs (every old class -> 0, new classes -> 1..k), adds
`aux_weight * CE_aux` to the loss from the second task on.

After each incremental task:
- weight aligning (`weight_align`, PyCIL's DER): the new classes' weight rows are scaled by
  gamma = mean norm(old rows) / mean norm(new rows);
- optional classifier re-training ("decouple", the official DER code): `decouple_epochs` epochs on the balanced
  memory, only the classifier trains (every extractor frozen, BatchNorm in eval mode), on logits divided by
  `decouple_temperature`; the classifier is re-initialised first (`decouple_reset_classifier`, as the official
  code). The official code re-trains on the task's data + old exemplars with a class-balanced sampler, BEFORE
  the memory update; here it is the harness's balanced-memory phase (`balanced_phase`, PhaseKind.DECOUPLE: its
  options `decouple_*`, harness.config.phases), on the updated memory, after every task but the first.

Pruning (`der_pruning`, off by default: DER w/o P in the paper's tables): the paper's channel-level masks. Each
extractor gets a HAT-style gate per conv layer, m = sigmoid(s * e), multiplied onto the layer's output channels
(after the BatchNorm that follows the conv, so a closed channel outputs exactly zero) while it trains; s is annealed
over each epoch's batches from 1/s_max to s_max (`der_prune_smax`), and `der_sparsity_lambda * L_S` joins the loss,
L_S = sum_l K_l |m_{l-1}|_1 |m_l|_1 / sum_l K_l c_{l-1} c_l (the weighted fraction of active weights; m_{l-1} is
the gate of the conv just before layer l when its channels match, else all ones). At the end of the task's main
phase the gate becomes binary, sigmoid(s_max * e) > `der_prune_threshold`, and stays applied: the pruned channels
output zero from then on (their weights are kept, so the next extractor still starts from a full copy).
`parameter_count()` counts the inference model (extractors + classifier; the auxiliary head and the gate
embeddings are training-only); with pruning on, a pruned extractor's conv kernels and biases and its BatchNorm
affine parameters count only for kept output channels (input-channel savings are not counted: a ResNet block's
input also carries the unmasked shortcut).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from harness.core.backbones import build_backbone
from harness.core.loop import GlobalBatchSampler
from harness.errors import ConfigError
from harness.core.method import Method, PhaseConfig, PhaseKind, TaskInfo
from harness.core.registry import register_method

# DER's own options when a config lacks them: the values of benchmarks/recipes/der/default.yaml (one place).
DEFAULTS = {"aux_weight": 1.0, "reuse_old_classifier": True, "weight_align": True, "decouple_temperature": 5.0,
            "decouple_reset_classifier": True, "der_pruning": False, "der_prune_smax": 400.0,
            "der_sparsity_lambda": 1.0, "der_prune_threshold": 0.5}


def aux_targets(targets: torch.Tensor, num_old_classes: int) -> torch.Tensor:
    """Auxiliary labels: every old class -> 0, new class num_old + j -> 1 + j."""
    return torch.where(targets < num_old_classes, torch.zeros_like(targets), targets - num_old_classes + 1)


def mask_scale(batch: int, num_batches: int, s_max: float) -> float:
    """HAT's annealed gate scale: 1/s_max at an epoch's first batch, rising linearly to s_max at its last."""
    if num_batches <= 1:
        return s_max
    return 1.0 / s_max + (s_max - 1.0 / s_max) * min(batch, num_batches - 1) / (num_batches - 1)


def _gated_modules(extractor: nn.Module) -> list[tuple[nn.Conv2d, nn.Module]]:
    """(conv, module whose output the gate multiplies) per conv: the BatchNorm right after it, else the conv."""
    leaves = [m for m in extractor.modules() if not list(m.children())]
    pairs = []
    for i, m in enumerate(leaves):
        if isinstance(m, nn.Conv2d):
            nxt = leaves[i + 1] if i + 1 < len(leaves) else None
            bn = isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == m.out_channels
            pairs.append((m, nxt if bn else m))
    return pairs


class ChannelMasks(nn.Module):
    """DER's learned channel gates over one extractor's conv layers (see the module docstring).

    `scale` is the annealed s while the extractor trains (s_max in eval mode); `prune()` turns the gates into
    fixed binary masks (`keep_<l>` buffers, checkpointed with `pruned`).
    """

    def __init__(self, extractor: nn.Module, s_max: float) -> None:
        super().__init__()
        pairs = _gated_modules(extractor)
        self.s_max, self.scale = float(s_max), float(s_max)
        # Every gate starts open, e = 0.5 (e = 0 sits on the threshold: on digits many channels closed even with
        # lambda_s = 0, measured), with no random draw (HAT draws e ~ N(0, 1)): the rest of the run's RNG stream
        # is untouched.
        self.embeddings = nn.ParameterList([nn.Parameter(torch.full((conv.out_channels,), 0.5))
                                           for conv, _ in pairs])
        for i, (conv, _) in enumerate(pairs):
            self.register_buffer(f"keep_{i}", torch.ones(conv.out_channels))
        self.register_buffer("pruned", torch.zeros((), dtype=torch.bool))
        self.kernel = [conv.kernel_size[0] * conv.kernel_size[1] for conv, _ in pairs]
        self.channels = [(conv.in_channels, conv.out_channels) for conv, _ in pairs]
        # Input gate of layer l: the gate just before it when its channels match the conv's input, else none.
        self.inputs = [i - 1 if i > 0 and self.channels[i - 1][1] == c_in else None
                       for i, (c_in, _) in enumerate(self.channels)]
        self._convs = [conv for conv, _ in pairs]
        self._targets = [target for _, target in pairs]
        for i, (_, target) in enumerate(pairs):
            target.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def apply(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
            return output * self.mask(i).to(output.dtype).view(1, -1, 1, 1)
        return apply

    def keep(self, i: int) -> torch.Tensor:
        return getattr(self, f"keep_{i}")

    def mask(self, i: int) -> torch.Tensor:
        if bool(self.pruned):
            return self.keep(i)
        scale = self.scale if self.training else self.s_max
        return torch.sigmoid(scale * self.embeddings[i])

    def sparsity_loss(self) -> torch.Tensor:
        """L_S: the kernel-size-weighted fraction of weights whose input and output channels are both open."""
        masks = [self.mask(i) for i in range(len(self.kernel))]
        active, total = masks[0].new_zeros(()), 0
        for i, (k, (c_in, c_out)) in enumerate(zip(self.kernel, self.channels)):
            prev = self.inputs[i]
            active = active + k * (masks[prev].sum() if prev is not None else c_in) * masks[i].sum()
            total += k * c_in * c_out
        return active / total

    @torch.no_grad()
    def prune(self, threshold: float) -> None:
        """Binary gates from here on: channel kept iff sigmoid(s_max * e) > threshold."""
        for i, e in enumerate(self.embeddings):
            self.keep(i).copy_((torch.sigmoid(self.s_max * e) > threshold).float())
            e.requires_grad_(False)
        self.pruned.fill_(True)

    def removed_parameters(self) -> int:
        """Parameters of the pruned output channels (conv kernel + bias, BatchNorm affine); 0 before pruning."""
        if not bool(self.pruned):
            return 0
        removed = 0
        for i, (conv, target) in enumerate(zip(self._convs, self._targets)):
            dropped = int((self.keep(i) == 0).sum())
            per_channel = conv.weight[0].numel() + (1 if conv.bias is not None else 0)
            if target is not conv:
                per_channel += sum(1 for p in (target.weight, target.bias) if p is not None)
            removed += dropped * per_channel
        return removed


class DERNet(nn.Module):
    """A list of feature extractors, a classifier over their concatenated features, an auxiliary head.

    `num_frozen` leading extractors are frozen: `train()` keeps them in eval mode (their BatchNorm statistics
    must not move when the harness loop calls model.train()).
    """

    def __init__(self, make_extractor: Callable[[], nn.Module], prune_smax: float | None = None) -> None:
        super().__init__()
        self._make_extractor = make_extractor
        self.extractors = nn.ModuleList()
        self.prune_smax = prune_smax                  # None: no channel gates (DER w/o P)
        self.masks = nn.ModuleList()                  # one ChannelMasks per extractor when pruning
        self.fc: nn.Linear | None = None
        self.aux_fc: nn.Linear | None = None
        self.num_frozen = 0

    @property
    def out_dim(self) -> int:
        """Features of ONE extractor."""
        return self.extractors[0].out_dim

    @property
    def feature_dim(self) -> int:
        return self.out_dim * len(self.extractors)

    @property
    def num_classes(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def add_task(self, num_new: int, reuse_old_classifier: bool = True) -> None:
        """New extractor (a copy of the last one), the old ones frozen, the classifier grown, a new aux head."""
        new = self._make_extractor()
        if len(self.extractors):
            new.load_state_dict(self.extractors[-1].state_dict())
            new = new.to(self._device())
        self.extractors.append(new)
        if self.prune_smax is not None:
            self.masks.append(ChannelMasks(new, self.prune_smax).to(self._device()))
        self.freeze_extractors(len(self.extractors) - 1)

        old_fc, old_classes = self.fc, self.num_classes
        fc = nn.Linear(self.feature_dim, old_classes + num_new).to(self._device())
        if old_fc is not None and reuse_old_classifier:
            with torch.no_grad():   # old classes keep their weights on the old features (top-left block)
                fc.weight[:old_classes, : old_fc.in_features] = old_fc.weight
                fc.bias[:old_classes] = old_fc.bias
        self.fc = fc
        # The aux head exists from the second extractor on (task 0 has no old classes to separate from).
        self.aux_fc = nn.Linear(self.out_dim, num_new + 1).to(self._device()) if len(self.extractors) > 1 else None

    def freeze_extractors(self, count: int) -> None:
        """Freeze the first `count` extractors (no grad, eval-mode BN); the rest train."""
        self.num_frozen = count
        for i, extractor in enumerate(self.extractors):
            for p in extractor.parameters():
                p.requires_grad_(i >= count)
        for i, masks in enumerate(self.masks):          # a pruned gate never trains again
            masks.embeddings.requires_grad_(i >= count and not bool(masks.pruned))
        self.train(self.training)

    def train(self, mode: bool = True) -> "DERNet":
        super().train(mode)
        for extractor in self.extractors[: self.num_frozen]:
            extractor.train(False)
        for masks in self.masks[: self.num_frozen]:
            masks.train(False)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([extractor(x) for extractor in self.extractors], dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        out = {"logits": self.fc(feats)}
        if self.aux_fc is not None:
            out["aux_logits"] = self.aux_fc(feats[:, -self.out_dim:])
        return out

    @torch.no_grad()
    def weight_align(self, num_new: int) -> float:
        """Scale the `num_new` last classes' weight rows so their mean norm equals the old rows'. Returns gamma."""
        w = self.fc.weight
        if num_new <= 0 or num_new >= w.shape[0]:
            return 1.0
        old_norm = w[:-num_new].norm(p=2, dim=1).mean()
        new_norm = w[-num_new:].norm(p=2, dim=1).mean()
        gamma = float(old_norm / new_norm) if new_norm > 0 else 1.0
        w[-num_new:] *= gamma
        return gamma

    def inference_parameter_count(self) -> int:
        kept = sum(p.numel() for p in self.extractors.parameters()) - sum(m.removed_parameters() for m in self.masks)
        return kept + sum(p.numel() for p in self.fc.parameters())


@register_method("der")
class DER(Method):
    """DER: one frozen extractor per past task, + aux loss, + weight aligning / decouple, + optional pruning."""

    balanced_phase = PhaseKind.DECOUPLE

    def option(self, key: str):
        value = self.config.get(key)
        return DEFAULTS[key] if value is None else value

    def build(self) -> None:
        c = self.config
        if float(self.option("aux_weight")) < 0:
            raise ConfigError(f"aux_weight must be >= 0, got {c.get('aux_weight')!r}")
        if float(self.option("decouple_temperature")) <= 0:
            raise ConfigError(f"decouple_temperature must be > 0, got {c.get('decouple_temperature')!r}")
        name, width, shortcut = c["backbone"], c.get("backbone_width"), c.get("resnet_shortcut")
        build_backbone(name, width, shortcut)                  # a bad option fails here, before any task
        self.pruning = bool(self.option("der_pruning"))
        if self.pruning:
            if float(self.option("der_prune_smax")) < 1:
                raise ConfigError(f"der_prune_smax must be >= 1, got {c.get('der_prune_smax')!r}")
            if not 0 < float(self.option("der_prune_threshold")) < 1:
                raise ConfigError(f"der_prune_threshold must be in (0, 1), got {c.get('der_prune_threshold')!r}")
        smax = float(self.option("der_prune_smax")) if self.pruning else None
        self.model = DERNet(lambda: build_backbone(name, width, shortcut).to(self.device), smax)
        self.aux_weight = float(self.option("aux_weight"))
        self.sparsity_lambda = float(self.option("der_sparsity_lambda"))
        self.gammas: list[float] = []
        self.step, self.batches_per_epoch = 0, 1           # the gate annealing's position in the main phase

    # ---- growth --------------------------------------------------------------------------------
    def before_task(self, task: TaskInfo) -> None:
        self.model.add_task(task.num_new_classes, bool(self.option("reuse_old_classifier")))

    def after_task(self, task: TaskInfo) -> None:
        if task.task_id > 0 and self.option("weight_align"):
            self.gammas.append(self.model.weight_align(task.num_new_classes))

    # ---- decouple (classifier re-training) stage -----------------------------------------------
    def before_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.TRAIN and self.pruning:
            self.step, self.batches_per_epoch = 0, self._main_batches(phase)
        if phase.kind is not PhaseKind.DECOUPLE:
            return
        self.model.freeze_extractors(len(self.model.extractors))   # every extractor, BN included
        if self.model.aux_fc is not None:
            self.model.aux_fc.requires_grad_(False)
        if self.option("decouple_reset_classifier"):
            self.model.fc.reset_parameters()

    def _main_batches(self, phase: PhaseConfig) -> int:
        """Batches per epoch of the main phase (task data + memory), as the loop's sampler makes them."""
        tools = getattr(self, "tools", None)
        if tools is None:                                   # driven without a trial: no annealing
            return 1
        memory = tools.memory_data()
        n = len(tools.task_data().y) + (len(memory.y) if memory is not None else 0)
        return len(GlobalBatchSampler(n, phase.batch_size, 0, 1, 0, False, repeats=phase.repeated_aug))

    def after_phase(self, phase: PhaseConfig, task: TaskInfo) -> None:
        if phase.kind is PhaseKind.TRAIN and self.pruning:   # the new extractor's gates become fixed binary masks
            self.model.masks[-1].prune(float(self.option("der_prune_threshold")))
        if phase.kind is not PhaseKind.DECOUPLE:
            return
        # Back to the state before_task left (a resumed trial replays only before_task).
        self.model.freeze_extractors(len(self.model.extractors) - 1)
        if self.model.aux_fc is not None:
            self.model.aux_fc.requires_grad_(True)

    def parameters_to_optimize(self, phase: PhaseConfig):
        if phase.kind is PhaseKind.DECOUPLE:
            return list(self.model.fc.parameters())
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch, task: TaskInfo, phase: PhaseConfig) -> torch.Tensor:
        x, y = batch
        if self.pruning and phase.kind is not PhaseKind.DECOUPLE:   # this batch's gate scale, before the forward
            masks = self.model.masks[-1]
            masks.scale = mask_scale(self.step % self.batches_per_epoch, self.batches_per_epoch, masks.s_max)
            self.step += 1
        out = self.net(x)
        if phase.kind is PhaseKind.DECOUPLE:
            return F.cross_entropy(out["logits"] / float(self.option("decouple_temperature")), y)
        loss = F.cross_entropy(out["logits"], y)
        if self.pruning and self.sparsity_lambda > 0:
            loss = loss + self.sparsity_lambda * self.model.masks[-1].sparsity_loss()
        if "aux_logits" in out and self.aux_weight > 0:
            loss = loss + self.aux_weight * F.cross_entropy(out["aux_logits"], aux_targets(y, task.num_old_classes))
        return loss

    # ---- inference -----------------------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cnn": self.model.fc(self.model.features(x))}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Concatenated features of every extractor (what the official code herds on).
        return self.model.features(x)

    def parameter_count(self) -> int:
        return self.model.inference_parameter_count()

    # ---- checkpointing -------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {"gammas": torch.tensor(self.gammas, dtype=torch.float64)}

    def load_extra_state(self, state: dict) -> None:
        if "gammas" in state:
            self.gammas = [float(g) for g in state["gammas"]]
