"""Build a `Sam` with weights: from a checkpoint (strict) or deterministic synthetic weights."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .sam import Sam

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of another architecture."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, for manifests."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(cfg: ModelConfig, path: Path) -> Sam:
    """Load `tinysam.pth` / `mobile_sam.pt` (or our own state_dict) strictly into a new model."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt pickles/zips
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    model = Sam(cfg)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in obj)
    unexpected = sorted(k for k in obj if k not in expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} is not a {cfg.name} checkpoint: {len(missing)} missing keys [{_summarise(missing)}], "
            f"{len(unexpected)} unexpected keys [{_summarise(unexpected)}]"
        )
    bad = [
        f"{k}: checkpoint {tuple(obj[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(obj[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise CheckpointError(f"{path} has tensors of the wrong shape: {_summarise(bad)}")
    model.load_state_dict(obj, strict=True)
    return model.eval()


def calibration_photos() -> list[np.ndarray]:
    """RGB photos bundled with scikit-image: always available offline, used to set BN statistics."""
    from .images import skimage_photos

    return [p.rgb for p in skimage_photos(["astronaut", "coffee", "chelsea", "rocket"])]


@torch.no_grad()
def synthetic_model(cfg: ModelConfig, seed: int) -> Sam:
    """The exact architecture with deterministic, realistically scaled random weights.

    Not a trained model: masks are not semantically meaningful. Scales are set so activations have
    the ranges of a trained network: BatchNorm statistics are measured on real photos, mask logits
    span about +-8 to +-20 like SAM's, and IoU predictions sit near 0.8-0.95.
    """
    torch.manual_seed(seed)
    model = Sam(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) or m.__class__.__name__ == "LayerNorm2d":
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=gen))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(0.5 + 0.5 * torch.rand(m.weight.shape, generator=gen))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        if hasattr(m, "attention_biases"):
            m.attention_biases.copy_(0.5 * torch.randn(m.attention_biases.shape, generator=gen))
        if hasattr(m, "rel_pos_h"):  # SAM ViT teachers: position terms are zero-initialised there
            m.rel_pos_h.copy_(0.1 * torch.randn(m.rel_pos_h.shape, generator=gen))
            m.rel_pos_w.copy_(0.1 * torch.randn(m.rel_pos_w.shape, generator=gen))
    if cfg.vit is not None:
        enc = model.image_encoder
        enc.pos_embed.copy_(0.5 * torch.randn(enc.pos_embed.shape, generator=gen))
    _damp_residual_branches(model)
    _measure_batchnorm(model)
    _scale_decoder_outputs(model, gen)
    if cfg.vit is not None:
        _centre_vit_mask_features(model)
    return model.eval()


def _damp_residual_branches(model: Sam) -> None:
    """Shrink every residual branch's output, as training does (TinyViT even starts MBConv's last
    BatchNorm at zero): the skip path carries the signal and no block dominates it. Without this a
    random network is far more sensitive to small perturbations than a trained one."""
    from .sam_vit import VitBlock
    from .tiny_vit import MBConv, TinyViTBlock

    for m in model.image_encoder.modules():
        if isinstance(m, MBConv):
            m.conv3.bn.weight.mul_(0.25)
        elif isinstance(m, (TinyViTBlock, VitBlock)):
            mlp_out = m.mlp.fc2 if isinstance(m, TinyViTBlock) else m.mlp.lin2
            for layer in (m.attn.proj, mlp_out):
                layer.weight.mul_(0.25)
                layer.bias.mul_(0.25)


def _measure_batchnorm(model: Sam) -> None:
    """Run the encoder in train mode over real photos so running mean/var are true statistics."""
    enc = model.image_encoder
    norms = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:  # SAM's ViTs: nothing to measure, and the encodes would cost minutes at ViT-H
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    enc.train()
    for photo in calibration_photos():
        x, _ = model.preprocess(photo)
        enc(x)
    enc.eval()


def _scale_decoder_outputs(model: Sam, gen: torch.Generator) -> None:
    """Scale the hypernetworks so mask logits have a SAM-like spread; bias the IoU head to ~0.88."""
    from .prompting import Decoding, Prompts

    dec = model.mask_decoder
    x, _ = model.preprocess(calibration_photos()[0])
    s = model.cfg.image_size
    coords = torch.rand((8, 1, 2), generator=gen) * s * 0.8 + s * 0.1
    masks, _, _ = Decoding(model, model.image_encoder(x))(Prompts(coords, torch.ones((8, 1))))
    std = float(masks.std())
    for mlp in dec.output_hypernetworks_mlps:
        last = mlp.layers[-1]
        last.weight.mul_(8.0 / max(std, 1e-6))
        last.bias.mul_(8.0 / max(std, 1e-6))
    head = dec.iou_prediction_head.layers[-1]
    head.weight.mul_(0.05)
    head.bias.fill_(0.88)


def _centre_vit_mask_features(model: Sam) -> None:
    """Synthetic SAM-ViT weights make masks that cover ~95 % of every image: the upscaled image
    features share a large mean that every hypernetwork output projects onto, so a teacher of such
    weights teaches nothing. Projecting that mean direction (measured on two photos, four seeded
    points each) out of the hypernetworks' outputs leaves masks of about half the image that
    follow the image features."""
    from .preprocess import resized_size
    from .prompting import Decoding, random_point_prompts

    dec = model.mask_decoder
    features = []
    hook = dec.output_upscaling.register_forward_hook(lambda _m, _i, out: features.append(out))
    for photo in calibration_photos()[:2]:
        size = resized_size(photo.shape[0], photo.shape[1], model.cfg.image_size)
        x, _ = model.preprocess(photo)
        Decoding(model, model.image_encoder(x))(random_point_prompts(4, size, torch.Generator().manual_seed(0)))
    hook.remove()
    mean = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features]).mean(0)
    unit = mean / mean.norm()
    drop_mean = torch.eye(len(unit)) - torch.outer(unit, unit)
    for mlp in dec.output_hypernetworks_mlps:
        mlp.layers[-1].weight.copy_(drop_mean @ mlp.layers[-1].weight)
        mlp.layers[-1].bias.copy_(drop_mean @ mlp.layers[-1].bias)
