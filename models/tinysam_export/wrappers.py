"""Traceable encoder and decoder graphs with the I/O contract the Rust runtime relies on."""

from __future__ import annotations

import torch
from torch import nn

from .sam import Sam

ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["image_embeddings"]
DECODER_INPUTS = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"]
DECODER_OUTPUTS = ["masks", "iou_predictions"]


class EncoderGraph(nn.Module):
    """(1, 3, S, S) normalised, padded image -> (1, D, S/16, S/16) embedding."""

    def __init__(self, model: Sam):
        super().__init__()
        self.encoder = model.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder for a batch of B prompts of N points against one embedding.

    Inputs: image_embeddings (1, D, e, e); point_coords (B, N, 2) in model-input pixels (after the
    resize, before padding); point_labels (B, N) as float (1 fg, 0 bg, 2/3 box corners, -1 pad);
    mask_input (1, 1, 4e, 4e) low-res logits shared by the batch; has_mask_input (1,) 0 or 1.
    Outputs: masks (B, 3, 4e, 4e) low-res logits; iou_predictions (B, 3).
    """

    def __init__(self, model: Sam):
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        e = model.cfg.embedding_size
        self.register_buffer("image_pe", model.prompt_encoder.pe_layer.dense(e).unsqueeze(0))

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        sparse = self.prompt_encoder.embed_points(point_coords, point_labels)
        dense = self.prompt_encoder.embed_mask(mask_input, has_mask_input)
        return self.mask_decoder(image_embeddings, self.image_pe, sparse, dense)
