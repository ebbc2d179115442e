"""Exported graphs agree with PyTorch; INT8 keeps fidelity and runs on QLinear ops."""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch

from tinysam_export.build import manifest_fidelity_key
from tinysam_export.config import TEST
from tinysam_export.images import skimage_photos
from tinysam_export.preprocess import preprocess
from tinysam_export.quantize import integer_mac_share
from tinysam_export.validate import MIN_MEAN_MASK_IOU, session
from tinysam_export.wrappers import DecoderGraph, EncoderGraph


@torch.no_grad()
def test_fp32_onnx_matches_pytorch_on_real_photos(test_model, built_test_dir):
    out, _ = built_test_dir
    enc = session(out / "encoder.fp32.onnx")
    dec = session(out / "decoder.fp32.onnx")
    egraph, dgraph = EncoderGraph(test_model).eval(), DecoderGraph(test_model).eval()
    for photo in skimage_photos(["astronaut", "rocket"]):
        x = preprocess(photo.rgb, TEST)
        ref = egraph(torch.from_numpy(x)).numpy()
        got = enc.run(None, {"image": x})[0]
        assert np.max(np.abs(got - ref)) < 1e-4
        coords = np.array([[[60.0, 80.0], [0, 0]], [[200.0, 100.0], [0, 0]], [[10, 10], [250, 200]]], np.float32)
        labels = np.array([[1, -1], [0, -1], [2, 3]], np.float32)
        mask = np.zeros((1, 1, 64, 64), np.float32)
        flag = np.zeros(1, np.float32)
        want = [t.numpy() for t in dgraph(torch.from_numpy(ref), *(torch.from_numpy(a) for a in (coords, labels, mask, flag)))]
        feeds = {"image_embeddings": ref, "point_coords": coords, "point_labels": labels, "mask_input": mask, "has_mask_input": flag}
        for g, w in zip(dec.run(None, feeds), want):
            assert np.max(np.abs(g - w)) / max(1.0, np.max(np.abs(w))) < 1e-4


def test_int8_fidelity_above_threshold(built_test_dir):
    _, manifest = built_test_dir
    key = manifest_fidelity_key(manifest)
    assert manifest["fidelity"][key]["mean_mask_iou"] >= MIN_MEAN_MASK_IOU
    assert manifest["fidelity"]["embedding_cosine_min"] > 0.95


def test_auto_decoder_is_the_fp32_split_decoder_quantized_at_load(built_test_dir):
    out, manifest = built_test_dir
    assert manifest["default"] == {"encoder": "int8", "decoder": "int8"}
    decoders = {(f["role"], f["precision"]) for f in manifest["files"] if f["role"].startswith("decoder")}
    # No INT8 decoder file: the runtime loads INT8 as the FP32 split graphs quantized at load.
    assert decoders == {("decoder", "fp32"), ("decoder_frame", "fp32"), ("decoder_prompt", "fp32"), ("decoder_masks", "fp32")}
    assert not (out / "decoder.int8.onnx").exists()
    chosen = json.loads((out / "fidelity.json").read_text())["chosen"]
    assert chosen == {"encoder": "int8", "decoder": "int8", "decoder_form": "quantized at load"}
    assert manifest_fidelity_key(manifest) == "int8_encoder_fp32_decoder"


def test_quantized_graph_uses_qoperator_ops(built_test_dir):
    out, _ = built_test_dir
    ops = {n.op_type for n in onnx.load(str(out / "encoder.int8.onnx")).graph.node}
    assert {"QLinearConv", "QLinearMatMul"} <= ops
    # No QDQ-only or contrib ops tract lacks.
    assert not ops & {"QLinearAdd", "QLinearMul", "QGemm", "QLinearSoftmax"}


def test_fully_quantized_fixture_runs_90_percent_in_integer_ops():
    from conftest import REPO

    share = integer_mac_share(REPO / "tests" / "fixtures" / "test_model" / "encoder.int8.onnx")
    assert share["integer_share"] >= 0.9, share


def test_default_model_mac_share_and_fidelity(default_manifest):
    enc = next(f for f in default_manifest["files"] if f["role"] == "encoder" and f["precision"] == "int8")
    # The stem stays float by design (see quantize.QuantOptions.float_stem): ~75% integer.
    assert enc["mac_share"]["integer_share"] >= 0.7
    assert default_manifest["weights"]["kind"] == "synthetic"
    key = manifest_fidelity_key(default_manifest)
    assert key == "int8_encoder_fp32_decoder", "the default decoder is INT8 quantized at load"
    assert default_manifest["fidelity"][key]["mean_mask_iou"] >= MIN_MEAN_MASK_IOU


def test_split_decoder_chains_to_the_one_graph_decoder_on_real_photos(built_test_dir):
    """The per-frame + per-prompt graphs the build ships give the one-graph decoder's outputs."""
    from tinysam_export.split_decoder import FRAME_INPUTS, MASKS_INPUTS, PROMPT_INPUTS

    out, manifest = built_test_dir
    roles = {f["role"]: f["path"] for f in manifest["files"] if f["precision"] == "fp32"}
    assert roles["decoder_frame"] == "decoder.frame.fp32.onnx"
    assert roles["decoder_prompt"] == "decoder.prompt.fp32.onnx"
    assert roles["decoder_masks"] == "decoder.masks.fp32.onnx"
    enc, one = session(out / "encoder.fp32.onnx"), session(out / "decoder.fp32.onnx")
    frame, prompt = session(out / roles["decoder_frame"]), session(out / roles["decoder_prompt"])
    masks = session(out / roles["decoder_masks"])
    for photo in skimage_photos(["astronaut", "coffee"]):
        emb = enc.run(None, {"image": preprocess(photo.rgb, TEST)})[0]
        coords = np.array([[[60.0, 80.0], [0, 0]], [[200.0, 100.0], [0, 0]], [[10, 10], [250, 200]]], np.float32)
        labels = np.array([[1, -1], [0, -1], [2, 3]], np.float32)
        for flag in (0.0, 1.0):
            mask = np.full((1, 1, 64, 64), 3.0 * flag, np.float32)
            mask[..., :32] *= -1
            has = np.array([flag], np.float32)
            want = one.run(None, {"image_embeddings": emb, "point_coords": coords, "point_labels": labels, "mask_input": mask,
                                      "has_mask_input": has})
            per_frame = frame.run(None, dict(zip(FRAME_INPUTS, (emb, mask, has))))
            tokens, weights, iou = prompt.run(None, dict(zip(PROMPT_INPUTS, (*per_frame, coords, labels))))
            (got_masks,) = masks.run(None, dict(zip(MASKS_INPUTS, (tokens, weights))))
            for g, w in zip((got_masks, iou), want):
                assert g.shape == w.shape
                assert np.max(np.abs(g - w)) / max(1.0, np.max(np.abs(w))) < 1e-4
