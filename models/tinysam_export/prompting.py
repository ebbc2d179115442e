"""Prompt batches in the decoder's point form, and decoding them on a fixed image embedding.

Shared by distillation (its sampled and hard prompts) and the synthetic weights (which calibrate
their decoder outputs on a few prompts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sam import Sam


@dataclass
class Prompts:
    """A batch of prompts in the decoder's point form: (P, L, 2) model-pixel coords, (P, L) labels
    (1 foreground, 0 background, 2/3 box corners, -1 padding)."""

    coords: torch.Tensor
    labels: torch.Tensor

    def append(self, coords: torch.Tensor, labels: torch.Tensor) -> Prompts:
        """Add one point per prompt ((P, 2) coords, (P,) labels)."""
        return Prompts(torch.cat([self.coords, coords[:, None]], 1), torch.cat([self.labels, labels[:, None]], 1))


def random_point_prompts(count: int, valid: tuple[int, int], gen: torch.Generator) -> Prompts:
    """`count` single foreground points uniform over the valid (h, w) area, each with the padding
    point SAM's predictor adds when there is no box."""
    h, w = valid
    xy = torch.rand((count, 2), generator=gen) * torch.tensor([w - 1, h - 1], dtype=torch.float32)
    coords = torch.stack([xy, torch.zeros_like(xy)], 1)
    labels = torch.tensor([[1.0, -1.0]]).repeat(count, 1)
    return Prompts(coords, labels)


class Decoding:
    """A model's prompt encoder and mask decoder on a fixed image embedding, without a mask input:
    the positional encoding and the no-mask dense embedding are made once."""

    def __init__(self, model: Sam, embedding: torch.Tensor):
        e = model.cfg.embedding_size
        self.model = model
        self.embedding = embedding
        self.image_pe = model.prompt_encoder.pe_layer.dense(e).unsqueeze(0).to(embedding.device)
        no_mask = torch.zeros((1, 1, 4 * e, 4 * e), device=embedding.device)
        self.dense = model.prompt_encoder.embed_mask(no_mask, torch.zeros(1, device=embedding.device))

    def __call__(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks (P, 3, 4e, 4e), IoU predictions (P, 3) and output tokens (P, 5, D)."""
        dev = self.embedding.device
        sparse = self.model.prompt_encoder.embed_points(prompts.coords.to(dev), prompts.labels.to(dev))
        return self.model.mask_decoder.predict(self.embedding, self.image_pe, sparse, self.dense)
