"""SAM prompt encoder and mask decoder, and the `Sam` container with TinySAM's state_dict layout.

Names follow the official modules (`prompt_encoder.pe_layer.positional_encoding_gaussian_matrix`,
`mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight` ...).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .preprocess import preprocess
from .sam_vit import ImageEncoderViT, MLPBlock
from .tiny_vit import LayerNorm2d, TinyViT


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding of normalised (x, y) coordinates."""

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates in [0, 1] (..., 2) -> (..., 2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def dense(self, size: int) -> torch.Tensor:
        """Encoding of every cell centre of a size x size grid, (C, size, size)."""
        grid = torch.ones((size, size), dtype=torch.float32)
        y = (grid.cumsum(dim=0) - 0.5) / size
        x = (grid.cumsum(dim=1) - 0.5) / size
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Embeds points, boxes (as two labelled corners) and a low-resolution mask."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.prompt_embed_dim
        self.embed_dim = d
        self.image_size = cfg.image_size
        self.embedding_size = cfg.embedding_size
        self.pe_layer = PositionEmbeddingRandom(d // 2)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, d) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, d)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, 4, kernel_size=2, stride=2),
            LayerNorm2d(4),
            nn.GELU(),
            nn.Conv2d(4, 16, kernel_size=2, stride=2),
            LayerNorm2d(16),
            nn.GELU(),
            nn.Conv2d(16, d, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, d)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) model-space pixel coords and (B, N) labels -> (B, N, D) sparse embeddings.

        Labels: 1 foreground, 0 background, 2/3 box top-left/bottom-right, -1 padding.
        """
        coords = (coords + 0.5) / self.image_size
        emb = self.pe_layer.encode(coords)
        labels = labels.unsqueeze(-1)
        emb = emb * (labels != -1).to(emb.dtype)
        emb = emb + self.not_a_point_embed.weight * (labels == -1).to(emb.dtype)
        for i, pe in enumerate(self.point_embeddings):
            emb = emb + pe.weight * (labels == i).to(emb.dtype)
        return emb

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """(M, 1, 4e, 4e) mask logits and (M,) flag -> (M, D, e, e) dense embedding."""
        flag = has_mask_input.reshape(-1, 1, 1, 1)
        dense = self.mask_downscaling(mask_input)
        return flag * dense + (1 - flag) * self.no_mask_embed.weight.reshape(1, -1, 1, 1)


class SamAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections and an optional downsampled width."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.internal_dim = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, self.internal_dim)
        self.k_proj = nn.Linear(dim, self.internal_dim)
        self.v_proj = nn.Linear(dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        c_per_head = q.shape[-1]
        attn = (q @ k.permute(0, 1, 3, 2)) / math.sqrt(c_per_head)
        out = attn.softmax(dim=-1) @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token attention."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = SamAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = SamAttention(dim, heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, F.relu)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = SamAttention(dim, heads, 2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer between prompt tokens and image tokens."""

    def __init__(self, depth: int, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([TwoWayAttentionBlock(dim, heads, mlp_dim, i == 0) for i in range(depth)])
        self.final_attn_token_to_image = SamAttention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (hypernetworks and IoU head)."""

    def __init__(self, cin: int, hidden: int, cout: int, num_layers: int):
        super().__init__()
        dims = [cin] + [hidden] * (num_layers - 1)
        outs = [hidden] * (num_layers - 1) + [cout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Predicts 3 masks (TinySAM keeps mask tokens 1..3) and their IoU from prompt tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.prompt_embed_dim
        self.transformer = TwoWayTransformer(cfg.decoder_depth, d, cfg.decoder_heads, cfg.decoder_mlp_dim)
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, d)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList([MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens)])
        self.iou_prediction_head = MLP(d, cfg.iou_head_hidden_dim, self.num_mask_tokens, 3)

    def forward(self, image_embeddings, image_pe, sparse, dense):
        """Image (1, D, e, e), PE (1, D, e, e), sparse (B, N, D), dense (M, D, e, e), M in {1, B}.

        Returns masks (B, 3, 4e, 4e) and IoU predictions (B, 3). Per-image tensors broadcast over
        the prompt batch instead of being repeated, so the image-side projections of the first
        layer run once per batch.
        """
        masks, iou, _ = self.predict(image_embeddings, image_pe, sparse, dense)
        return masks, iou

    def predict(self, image_embeddings, image_pe, sparse, dense):
        """`forward`, plus the output tokens after the two-way transformer: (B, 1 + 4, D), the IoU
        token then the mask tokens (what distillation's token term compares)."""
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        out_tokens = out_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        src = image_embeddings + dense
        _, c, h, w = src.shape
        hs, keys = self.transformer(src, image_pe, tokens)
        iou_out = hs[:, 0, :]
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        keys = keys.expand(b, -1, -1)
        src = keys.transpose(1, 2).reshape(b, c, h, w)
        up = self.output_upscaling(src)
        hyper = torch.stack([mlp(mask_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, uc, uh, uw = up.shape
        masks = (hyper @ up.reshape(b, uc, uh * uw)).reshape(b, -1, uh, uw)
        iou = self.iou_prediction_head(iou_out)
        return masks[:, 1:], iou[:, 1:], hs[:, : 1 + self.num_mask_tokens, :]


class Sam(nn.Module):
    """The whole model with the official top-level names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoderViT(cfg) if cfg.vit is not None else TinyViT(cfg)
        self.prompt_encoder = PromptEncoder(cfg)
        self.mask_decoder = MaskDecoder(cfg)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False)

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, float]:
        """HxWx3 uint8 image -> normalised, padded (1, 3, S, S) tensor and the resize scale."""
        x = preprocess(rgb, self.cfg)
        return torch.from_numpy(x), self.cfg.image_size / max(rgb.shape[:2])
