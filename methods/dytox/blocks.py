"""DyTox building blocks: patch embedding, ConViT GPSA self-attention blocks (the encoder's SABs) and the
CaiT-style class-attention block used as DyTox's Task-Attention Block (TAB).

Written from the papers' equations (ConViT, d'Ascoli et al. 2021; CaiT, Touvron et al. 2021; DyTox, Douillard
et al. 2022) and the reference notes (shared/reference/dytox.md), section 1.1. Shapes: B batch, N patches,
T task tokens, C = embed dim, H heads, d = C // H.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn


def init_vit_weights(module: nn.Module) -> None:
    """ViT init applied to every Linear / LayerNorm of the encoder and TAB (as ConViT / CaiT do)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _drop_path_per_row(drop_path: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DropPath on (B, T, C) with one independent draw per (sample, token), exactly as the per-token loop does
    (the original's joint-token mode shared one draw across all tokens of a sample)."""
    if isinstance(drop_path, nn.Identity) or not drop_path.training:
        return x
    b, t, c = x.shape
    return drop_path(x.reshape(b * t, 1, c)).reshape(b, t, c)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: Conv2d(in, C, k=p, s=p), flattened row-major to (B, N, C)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


def relative_indices(grid: int) -> torch.Tensor:
    """(N, N, 3) with, for query patch i and key patch j: (dx, dy, dx^2 + dy^2), dx/dy = key - query column/row."""
    rows = torch.arange(grid).repeat_interleave(grid)      # patch p = row * grid + col (PatchEmbed's order)
    cols = torch.arange(grid).repeat(grid)
    dx = (cols[None, :] - cols[:, None]).float()
    dy = (rows[None, :] - rows[:, None]).float()
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)


class GPSA(nn.Module):
    """ConViT gated positional self-attention.

    attn_h = (1 - sigmoid(g_h)) softmax(q k^T * scale) + sigmoid(g_h) softmax(pos_proj(r)_h), renormalised.
    The positional half does not depend on the input, so it is computed once per forward as (H, N, N).

    fused=True computes the content half with F.scaled_dot_product_attention and the positional half as one
    matmul: since both softmaxes sum to 1, the convex mix already sums to 1 and the renormalisation is the
    identity, so out = (1 - s) SDPA(q, k, v) + s (P v) is the same maths (checked in the tests to 1e-5).
    It falls back to the explicit path when attention dropout is active (dropout would hit only one half).
    """

    def __init__(self, dim: int, num_heads: int, grid: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, locality_strength: float = 1.0, fused: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.locality_strength = locality_strength
        self.fused = fused
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        # Deterministic from the grid: not saved in checkpoints.
        self.register_buffer("rel_indices", relative_indices(grid), persistent=False)

    @torch.no_grad()
    def local_init(self) -> None:
        """v = identity; head h of the first k*k (k = int(sqrt(H))) looks at offset (dx, dy) of a k x k grid:
        score = -(dx - ox)^2 - (dy - oy)^2 + const = -r^2 + 2 ox dx + 2 oy dy. Other heads keep their init."""
        self.v.weight.copy_(torch.eye(self.dim))
        k = int(self.num_heads ** 0.5)
        center = (k - 1) / 2 if k % 2 == 0 else k // 2
        for h in range(k * k):
            oy, ox = h % k - center, h // k - center
            self.pos_proj.weight[h] = torch.tensor([2.0 * ox, 2.0 * oy, -1.0])
        self.pos_proj.weight.mul_(self.locality_strength)

    def positional_attention(self) -> torch.Tensor:
        """(H, N, N) softmax of the positional scores."""
        return self.pos_proj(self.rel_indices).permute(2, 0, 1).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if n != self.rel_indices.shape[0]:
            raise ValueError(f"GPSA was built for {self.rel_indices.shape[0]} patches, got {n}")
        q, k = self.qk(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        v = self.v(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        pos = self.positional_attention()
        gate = torch.sigmoid(self.gating_param).view(self.num_heads, 1, 1)
        if self.fused and not (self.training and self.attn_drop.p > 0):
            content = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
            out = (1.0 - gate) * content + gate * (pos @ v)
        else:
            attn = (1.0 - gate) * (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1) + gate * pos
            attn = attn / attn.sum(dim=-1, keepdim=True)
            out = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class SelfAttentionBlock(nn.Module):
    """Encoder SAB, pre-norm: x += DropPath(GPSA(LN(x))); x += DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, grid: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 locality_strength: float = 1.0, fused: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GPSA(dim, num_heads, grid, qkv_bias, attn_drop, drop, locality_strength, fused)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClassAttention(nn.Module):
    """CaiT class attention: the query comes from the (task) token only, keys/values from token + patches.

    fused=True uses F.scaled_dot_product_attention, fused=False an explicit softmax (same maths).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, fused: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused = fused
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)   # (B, H, L, d)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, length, _ = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, length, -1)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: normalised [token; patches] (B, 1+N, C) -> attention output for the token (B, 1, C)."""
        q, k, v = self._heads(self.q(z[:, :1])), self._heads(self.k(z)), self._heads(self.v(z))
        drop = self.attn_drop.p if self.training else 0.0
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            o = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)) @ v
        return self._out(o)

    def forward_batched(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """All T tokens in one pass, each attending to itself and the patches only (never to other tokens):
        identical to running forward() once per token. tokens: normalised (B or 1, T, C); patches: normalised
        (B, N, C) -> (B, T, C). Patch keys/values are computed once and shared by the T tokens."""
        b = patches.shape[0]
        q, kt, vt = self._heads(self.q(tokens)), self._heads(self.k(tokens)), self._heads(self.v(tokens))
        kx, vx = self._heads(self.k(patches)), self._heads(self.v(patches))
        t = tokens.shape[1]
        drop = self.attn_drop.p if self.training else 0.0
        if self.fused:
            keys = torch.cat([kt.expand(b, -1, -1, -1), kx], dim=2)
            values = torch.cat([vt.expand(b, -1, -1, -1), vx], dim=2)
            # Token i may see token i (diagonal) and every patch.
            allowed = torch.cat([torch.eye(t, dtype=torch.bool, device=patches.device),
                                 torch.ones(t, kx.shape[2], dtype=torch.bool, device=patches.device)], dim=1)
            o = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), keys, values, attn_mask=allowed,
                                               dropout_p=drop, scale=self.scale)
        else:
            self_score = (q * kt).sum(dim=-1, keepdim=True) * self.scale            # (B|1, H, T, 1)
            patch_score = q @ kx.transpose(-2, -1) * self.scale                     # (B, H, T, N)
            attn = torch.cat([self_score.expand(b, -1, -1, -1), patch_score], dim=-1).softmax(dim=-1)
            attn = self.attn_drop(attn)
            o = attn[..., :1] * vt + attn[..., 1:] @ vx
        return self._out(o)


class TaskAttentionBlock(nn.Module):
    """DyTox TAB (CaiT class-attention block) for a task token theta and patch tokens x:
    z = LN1([theta; x]); theta' = theta + DropPath(CA(z)); theta'' = theta' + DropPath(MLP(LN2(theta')))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, fused: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, qkv_bias, attn_drop, drop, fused)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, token: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """token (B, 1, C), x (B, N, C) -> updated token (B, 1, C)."""
        z = self.norm1(torch.cat([token, x], dim=1))
        token = token + self.drop_path(self.attn(z))
        return token + self.drop_path(self.mlp(self.norm2(token)))

    def forward_batched(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """tokens (B or 1, T, C), x (B, N, C) -> (B, T, C); equals T calls of forward().
        LayerNorm is per position, so LN1([theta; x]) = [LN1(theta); LN1(x)] and LN1(x) is shared."""
        b, t, c = x.shape[0], tokens.shape[1], tokens.shape[2]
        attn = self.attn.forward_batched(self.norm1(tokens), self.norm1(x))
        tokens = tokens.expand(b, t, c) + _drop_path_per_row(self.drop_path, attn)
        return tokens + _drop_path_per_row(self.drop_path, self.mlp(self.norm2(tokens)))
