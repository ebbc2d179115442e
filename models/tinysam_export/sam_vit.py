"""SAM's ViT-B/L/H image encoder, the teachers of distillation.

Module and parameter names follow the official `sam_vit_*.pth` layout (`image_encoder.pos_embed`,
`image_encoder.blocks.7.attn.rel_pos_h`, `image_encoder.neck.2.weight` ...) so Meta's released
checkpoints load strictly. The maths is SAM's: a 16x16 patch embedding plus an absolute position
table, transformer blocks that attend inside 14x14 windows except a few global ones, attention logits
with decomposed relative-position terms (one table along y, one along x), and the conv + LayerNorm
neck down to the prompt width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, VitConfig
from .tiny_vit import LayerNorm2d


def relative_position_table(size: int, table: torch.Tensor) -> torch.Tensor:
    """(size, size, C) terms for query row i and key row j: `table[i - j + size - 1]`.

    Queries and keys always have the same extent here (windows attend to themselves, global blocks
    to the whole map), so no resampling of the table is needed; its length is 2 * size - 1."""
    idx = torch.arange(size)
    return table[idx[:, None] - idx[None, :] + size - 1]


class VitAttention(nn.Module):
    """Multi-head self-attention over an (H, W) grid with decomposed relative positions."""

    def __init__(self, dim: int, num_heads: int, grid: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        # Relative-position terms use the unscaled queries, as SAM does.
        grid_q = q.reshape(b * heads, h, w, -1)
        along_y = torch.einsum("bhwc,hkc->bhwk", grid_q, relative_position_table(h, self.rel_pos_h))
        along_x = torch.einsum("bhwc,wkc->bhwk", grid_q, relative_position_table(w, self.rel_pos_w))
        attn = attn.view(b * heads, h, w, h, w) + along_y[:, :, :, :, None] + along_x[:, :, :, None, :]
        attn = attn.view(b * heads, h * w, h * w).softmax(dim=-1)
        out = (attn @ v).view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class MLPBlock(nn.Module):
    """Feed-forward of SAM's transformers: lin1, `activation`, lin2 (GELU in the ViT encoder's
    blocks, ReLU in the mask decoder's two-way transformer)."""

    def __init__(self, dim: int, hidden: int, activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.activation(self.lin1(x)))


def split_windows(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, window, window, C), zero-padding H and W up to a multiple."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    ph, pw = h + pad_h, w + pad_w
    x = x.view(b, ph // window, window, pw // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (ph, pw)


def merge_windows(x: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `split_windows`: back to (B, H, W, C) with the padding cut off."""
    ph, pw = padded
    h, w = size
    c = x.shape[-1]
    b = x.shape[0] // ((ph // window) * (pw // window))
    x = x.view(b, ph // window, pw // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, ph, pw, c)[:, :h, :w, :].contiguous()


class VitBlock(nn.Module):
    """Pre-norm transformer block; windowed attention unless `window` is 0 (global)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: int, grid: int):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VitAttention(dim, num_heads, window if window > 0 else grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), F.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window > 0:
            size = (x.shape[1], x.shape[2])
            x, padded = split_windows(x, self.window)
            x = merge_windows(self.attn(x), self.window, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, output channels-last (B, H/p, W/p, D)."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """The image encoder of SAM ViT-B/L/H: (1, 3, S, S) normalised image -> (1, D, S/16, S/16)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        vit: VitConfig | None = cfg.vit
        if vit is None:
            raise ValueError(f"{cfg.name} has no ViT encoder settings")
        grid = cfg.image_size // vit.patch_size
        dim = vit.embed_dim
        self.patch_embed = PatchEmbed(vit.patch_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.blocks = nn.ModuleList(
            VitBlock(dim, vit.num_heads, vit.mlp_ratio, 0 if i in vit.global_attn_indexes else vit.window_size, grid)
            for i in range(vit.depth)
        )
        d = cfg.prompt_embed_dim
        self.neck = nn.Sequential(
            nn.Conv2d(dim, d, 1, bias=False), LayerNorm2d(d), nn.Conv2d(d, d, 3, padding=1, bias=False), LayerNorm2d(d)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
