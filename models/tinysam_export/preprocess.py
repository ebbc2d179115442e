"""SAM's image and coordinate preprocessing: the reference the Rust implementation is tested against."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .config import ModelConfig


def resized_size(height: int, width: int, target: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side to `target`, rounded as SAM rounds."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(rgb: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """HxWx3 uint8 -> (1, 3, S, S) float32: PIL bilinear resize on uint8, normalise, zero-pad."""
    s = cfg.image_size
    nh, nw = resized_size(rgb.shape[0], rgb.shape[1], s)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((nw, nh), Image.BILINEAR))
    x = (resized.astype(np.float32) - np.array(cfg.pixel_mean, np.float32)) / np.array(cfg.pixel_std, np.float32)
    out = np.zeros((1, 3, s, s), np.float32)
    out[0, :, :nh, :nw] = x.transpose(2, 0, 1)
    return out


def to_model_coords(coords: np.ndarray, height: int, width: int, cfg: ModelConfig) -> np.ndarray:
    """Original-image pixel coordinates (..., 2) as (x, y) -> model-input coordinates."""
    nh, nw = resized_size(height, width, cfg.image_size)
    out = np.asarray(coords, np.float32).copy()
    out[..., 0] *= nw / width
    out[..., 1] *= nh / height
    return out
