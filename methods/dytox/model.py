"""The DyTox network: a shared GPSA encoder, one shared Task-Attention Block, one learned token and one
independent classifier per task, plus a divergence head for the newest task (dytox.md section 1).

Typical use by a method (dytox.md 1.2):
    model = DyTox(DyToxConfig.from_options(config))
    task t:   model.add_task(n_new)                                 # token, head (+ fresh div head from t=2)
              model.freeze(["old_task_tokens", "old_heads"] if t > 0 else [])
              out = model(x)   # {"logits", "div_logits", "tokens", "embeddings"}
    finetune: model.freeze(["sab", "div_head"])                     # old tokens/heads trainable again
    teacher:  teacher = copy.deepcopy(model); teacher.freeze(["all"])
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Iterable

import torch
from timm.layers import trunc_normal_
from torch import nn

from harness.errors import ConfigError
from methods.dytox.blocks import (GPSA, PatchEmbed, SelfAttentionBlock, TaskAttentionBlock,
                                  init_vit_weights)

FREEZE_GROUPS = ("all", "old_task_tokens", "task_tokens", "sab", "tab", "old_heads", "heads", "div_head",
                 "head_div")


@dataclass
class DyToxConfig:
    """Network options. Defaults = CIFAR DyTox (options/model/cifar_dytox.yaml + main.py defaults)."""

    img_size: int = 32                # yaml `input_size` (224 with patch_size 16 for ImageNet)
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 6                    # SABs + TABs
    num_heads: int = 12
    local_up_to_layer: int = 5        # number of GPSA SABs; the remaining depth - 5 blocks are TABs
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    drop_rate: float = 0.0            # yaml `drop`
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1       # yaml `drop_path`; linspace(0, rate, depth) over all blocks
    locality_strength: float = 1.0
    div_head: bool = True             # yaml `head_div` > 0: create a divergence head from the 2nd task on
    fused_attention: bool = True      # TAB attention via F.scaled_dot_product_attention
    fused_gpsa: bool = False          # GPSA content half via SDPA (same maths; see GPSA)
    batched_tokens: bool = True       # all task tokens in one TAB pass (same maths as the original's loop)
    freeze_eval: bool = True          # frozen modules stay in eval under model.train() (fixes the original)

    # Original yaml / CLI key -> field, so DyTox option files map directly.
    ALIASES: ClassVar[dict[str, str]] = {"input_size": "img_size", "image_size": "img_size", "drop": "drop_rate",
                                         "drop_path": "drop_path_rate", "attn_drop": "attn_drop_rate"}

    @classmethod
    def from_options(cls, options: dict[str, Any], prefix: str = "") -> "DyToxConfig":
        """Pick the known keys (optionally `prefix`-ed, e.g. 'dytox_') from a flat config; ignore the rest.
        `head_div` (a loss weight in the original) turns the divergence head on when > 0."""
        names = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            if not key.startswith(prefix) or value is None:
                continue
            key = key[len(prefix):]
            key = cls.ALIASES.get(key, key)
            if key == "head_div":
                kwargs["div_head"] = float(value) > 0
            elif key in names:
                kwargs[key] = value
        return cls(**kwargs)


class ContinualClassifier(nn.Module):
    """LayerNorm(D) -> Linear(D, n). PyTorch's default Linear init, as the original (it never re-inits heads)."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


class DyTox(nn.Module):
    """DyTox network. Tokens and heads are added with `add_task`; call it for the first task too.

    Frozen-module fix: the original `freeze()` put frozen modules in eval, but the training loop's
    `model.train()` put them back in train mode, so frozen SABs kept applying stochastic depth during
    finetuning (its `--freeze-eval` flag was never wired). Here `train(mode)` re-applies eval to the modules
    frozen by the last `freeze()` call; `freeze_eval=False` restores the original behaviour.
    """

    def __init__(self, config: DyToxConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = replace(config or DyToxConfig(), **overrides)   # a private copy: callers may reuse theirs
        if not 0 <= cfg.local_up_to_layer < cfg.depth:
            raise ConfigError(f"local_up_to_layer={cfg.local_up_to_layer} must be in [0, depth={cfg.depth}): "
                              "DyTox needs at least one task-attention block")
        self.config = cfg
        d = cfg.embed_dim
        self.embed_dim = d
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, d))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()   # stochastic depth rule
        common = dict(mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate,
                      attn_drop=cfg.attn_drop_rate)
        self.sabs = nn.ModuleList([
            SelfAttentionBlock(d, cfg.num_heads, self.patch_embed.grid, drop_path=dpr[i],
                               locality_strength=cfg.locality_strength, fused=cfg.fused_gpsa, **common)
            for i in range(cfg.local_up_to_layer)])
        self.tabs = nn.ModuleList([
            TaskAttentionBlock(d, cfg.num_heads, drop_path=dpr[i], fused=cfg.fused_attention, **common)
            for i in range(cfg.local_up_to_layer, cfg.depth)])
        self.task_tokens = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.div_head: ContinualClassifier | None = None
        self.classes_per_task: list[int] = []
        self._frozen_eval: tuple[str, ...] = ()

        trunc_normal_(self.pos_embed, std=0.02)
        self.sabs.apply(init_vit_weights)
        self.tabs.apply(init_vit_weights)
        for m in self.sabs.modules():      # after the generic init, as ConViT does
            if isinstance(m, GPSA):
                m.local_init()

    # ---- growth ------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.task_tokens)

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_task)

    def add_task(self, num_new_classes: int) -> None:
        """New task: a fresh token (trunc normal .02), a new head for its classes and, from the second task
        on (and when `div_head`), a fresh divergence head (|C_t| + 1 outputs) replacing the previous one."""
        if num_new_classes <= 0:
            raise ConfigError(f"a task must bring at least one class, got {num_new_classes}")
        ref = self.pos_embed
        token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=ref.device, dtype=ref.dtype))
        trunc_normal_(token, std=0.02)
        self.task_tokens.append(token)
        self.heads.append(ContinualClassifier(self.embed_dim, num_new_classes).to(ref.device, ref.dtype))
        if self.config.div_head and self.num_tasks > 1:
            self.div_head = ContinualClassifier(self.embed_dim, num_new_classes + 1).to(ref.device, ref.dtype)
        self.classes_per_task.append(num_new_classes)

    # ---- forward -----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> patch tokens after the SABs (B, N, D)."""
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        for blk in self.sabs:
            x = blk(x)
        return x

    def decode(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) -> task embeddings (B, T, D), e_i from token i, in task order."""
        if self.num_tasks == 0:
            raise RuntimeError("DyTox has no task token yet: call add_task() first")
        if self.config.batched_tokens:
            t = torch.cat(list(self.task_tokens), dim=1)                   # (1, T, D)
            for blk in self.tabs:
                t = blk.forward_batched(t, patches)
            return t
        embeddings = []
        for token in self.task_tokens:      # the original's per-token loop
            t = token.expand(patches.shape[0], -1, -1)
            for blk in self.tabs:
                t = blk(t, patches)
            embeddings.append(t)
        return torch.cat(embeddings, dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated task embeddings [e_1, ..., e_T] (B, T*D): the features used for herding."""
        return self.decode(self.encode(x)).flatten(1)

    def forward(self, x: torch.Tensor, with_div: bool | None = None) -> dict[str, torch.Tensor | None]:
        """logits (B, seen classes) = [head_i(e_i)] in task order; div_logits = div_head(e_T) (None without a
        div head, and by default in eval mode; pass with_div=False in finetuning, where the original skips it);
        tokens (B, T, D); embeddings (B, T*D), the same values flattened."""
        tokens = self.decode(self.encode(x))
        logits = torch.cat([head(tokens[:, i]) for i, head in enumerate(self.heads)], dim=1)
        use_div = self.training if with_div is None else with_div
        div_logits = self.div_head(tokens[:, -1]) if use_div and self.div_head is not None else None
        return {"logits": logits, "div_logits": div_logits, "tokens": tokens, "embeddings": tokens.flatten(1)}

    # ---- freezing ----------------------------------------------------------------------------------
    def _group(self, name: str) -> tuple[list[nn.Parameter], list[str]]:
        """Parameters and module names (for eval mode) of a freeze group."""
        n_old = max(self.num_tasks - 1, 0)
        if name == "all":
            return list(self.parameters()), [""]
        if name == "old_task_tokens":
            return list(self.task_tokens)[:n_old], []
        if name == "task_tokens":
            return list(self.task_tokens), []
        if name == "sab":
            params = [*self.patch_embed.parameters(), self.pos_embed, *self.sabs.parameters()]
            return params, ["patch_embed", "pos_drop", "sabs"]
        if name == "tab":
            return list(self.tabs.parameters()), ["tabs"]
        if name == "old_heads":
            old = list(self.heads)[:n_old]
            return [p for h in old for p in h.parameters()], [f"heads.{i}" for i in range(n_old)]
        if name == "heads":      # the per-task heads only, as the original ("div_head" is its own group)
            return list(self.heads.parameters()), ["heads"]
        if name in ("div_head", "head_div"):
            if self.div_head is None:
                return [], []
            return list(self.div_head.parameters()), ["div_head"]
        raise ConfigError(f"unknown DyTox freeze group {name!r}; use some of {', '.join(FREEZE_GROUPS)}")

    def freeze(self, names: Iterable[str]) -> None:
        """Like the original: make everything trainable and set train mode, then freeze the listed groups
        (requires_grad=False, modules in eval). With `freeze_eval` they stay in eval under train()."""
        groups = [self._group(n) for n in names]          # validate every name before changing anything
        self._frozen_eval = ()
        for p in self.parameters():
            p.requires_grad_(True)
        self.train(True)
        modules: list[str] = []
        for params, module_names in groups:
            for p in params:
                p.requires_grad_(False)
            modules.extend(module_names)
        for name in modules:
            nn.Module.train(self.get_submodule(name), False)
        if self.config.freeze_eval:
            self._frozen_eval = tuple(dict.fromkeys(modules))

    def train(self, mode: bool = True) -> "DyTox":
        super().train(mode)
        if mode:
            for name in self._frozen_eval:
                nn.Module.train(self.get_submodule(name), False)   # nn.Module's: no recursion into this one
        return self

    # ---- introspection -----------------------------------------------------------------------------
    @torch.no_grad()
    def token_distances(self) -> dict[str, float]:
        """Mean / min / max L2 distance between task tokens (the original's epoch_log)."""
        dists = [torch.dist(a, b).item() for a, b in itertools.combinations(self.task_tokens, 2)]
        if not dists:
            return {"token_mean_dist": 0.0, "token_min_dist": 0.0, "token_max_dist": 0.0}
        return {"token_mean_dist": sum(dists) / len(dists), "token_min_dist": min(dists),
                "token_max_dist": max(dists)}


def count_parameters(model: DyTox, include_div_head: bool = False) -> int:
    """Number of parameters, without the divergence head by default (it is discarded at test time and
    the paper's #P excludes it)."""
    skip = set() if include_div_head or model.div_head is None else {id(p) for p in model.div_head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
