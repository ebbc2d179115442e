"""Checkpoint loading: strict round trip, clear errors for wrong or broken files."""

from __future__ import annotations

import pytest
import torch

from tinysam_export.config import FULL, TEST
from tinysam_export.sam import Sam
from tinysam_export.weights import CheckpointError, load_checkpoint, synthetic_model


def test_state_dict_round_trips_strictly(test_model, tmp_path):
    path = tmp_path / "ours.pth"
    torch.save(test_model.state_dict(), path)
    loaded = load_checkpoint(TEST, path)
    for k, v in test_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_wrapped_state_dict_is_unwrapped(test_model, tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": test_model.state_dict(), "epoch": 3}, path)
    load_checkpoint(TEST, path)


def test_official_key_layout():
    keys = set(Sam(FULL).state_dict())
    for k in [
        "image_encoder.patch_embed.seq.0.c.weight",
        "image_encoder.layers.0.blocks.0.conv2.bn.running_var",
        "image_encoder.layers.1.blocks.0.attn.attention_biases",
        "image_encoder.layers.3.blocks.1.mlp.fc2.weight",
        "image_encoder.neck.3.bias",
        "image_encoder.head.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.mask_downscaling.6.weight",
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
        "mask_decoder.output_hypernetworks_mlps.3.layers.2.bias",
        "mask_decoder.iou_prediction_head.layers.2.weight",
    ]:
        assert k in keys, k
    assert not any("attention_bias_idxs" in k or "pixel_mean" in k for k in keys)


def test_wrong_architecture_names_the_keys(test_model, tmp_path):
    sd = dict(test_model.state_dict())
    sd.pop("mask_decoder.iou_token.weight")
    sd["image_encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "other.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys \[mask_decoder.iou_token.weight\].*unexpected keys \[image_encoder.extra.weight\]"):
        load_checkpoint(TEST, path)


def test_wrong_sizes_are_named(test_model, tmp_path):
    path = tmp_path / "small.pth"
    torch.save(test_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="wrong shape: image_encoder"):
        load_checkpoint(FULL, path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(TEST, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(TEST, bad)


def test_synthetic_weights_are_deterministic_and_not_degenerate():
    a, b = synthetic_model(TEST, 0), synthetic_model(TEST, 0)
    c = synthetic_model(TEST, 1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.state_dict()["mask_decoder.iou_token.weight"], c.state_dict()["mask_decoder.iou_token.weight"])
    bn = a.state_dict()["image_encoder.layers.0.blocks.0.conv1.bn.running_var"]
    assert bool((bn > 0).all()) and float(bn.std()) > 0
