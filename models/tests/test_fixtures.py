"""The committed Rust fixtures are reproducible from the code."""

from __future__ import annotations

import json

import numpy as np
import onnx
from conftest import REPO
from onnx import numpy_helper

from tinysam_export.fixtures import write_fixtures
from tinysam_export.validate import cosine

FP32_GOLDEN = ["preprocessed.npy", "embedding.fp32.npy", "masks.fp32.npy", "iou.fp32.npy"]


def scaled_max_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| over max(1, max |b|): the Rust tests' measure of output error."""
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(1.0, float(np.max(np.abs(b)))))


def test_fixtures_reproduce(tmp_path):
    write_fixtures(tmp_path)
    committed = REPO / "tests" / "fixtures"

    # The quantized models: the same graph and the same integer tensors; float tensors (folded
    # weights, scales) within the last bits that torch's and onnxruntime's CPU-specific float
    # kernels leave (measured: 1e-4 relative for folded weights, 2e-6 for scales, between an AVX2
    # and an AVX-512 machine).
    for name in ["encoder.int8.onnx", "decoder.int8.onnx"]:
        new, old = onnx.load(str(tmp_path / "test_model" / name)), onnx.load(str(committed / "test_model" / name))
        assert [(n.op_type, list(n.input)) for n in new.graph.node] == [(n.op_type, list(n.input)) for n in old.graph.node], name
        old_init = {t.name: numpy_helper.to_array(t) for t in old.graph.initializer}
        for t in new.graph.initializer:
            a, b = numpy_helper.to_array(t), old_init[t.name]
            assert a.shape == b.shape and a.dtype == b.dtype, (name, t.name)
            if np.issubdtype(a.dtype, np.integer):
                assert np.array_equal(a, b), (name, t.name)
            else:
                np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7, err_msg=f"{name}: {t.name}")

    golden = committed / "golden"
    for name in FP32_GOLDEN:
        a, b = np.load(tmp_path / "golden" / name), np.load(golden / name)
        assert a.shape == b.shape, name
        assert scaled_max_err(a, b) < 1e-5, (name, scaled_max_err(a, b))

    # The INT8 outputs are onnxruntime's, and its integer kernels depend on the CPU: on AVX2
    # without VNNI the u8s8 products go through `vpmaddubsw`, which saturates, while VNNI's do not
    # (measured on an AVX-512/VNNI machine against goldens made on AVX2: embedding cosine 0.9943,
    # mask cosine 0.9959, 97.6 % of mask pixels on the same side of 0). So they are compared by
    # similarity, with the same model (checked above).
    emb_new, emb_old = np.load(tmp_path / "golden" / "embedding.int8.npy"), np.load(golden / "embedding.int8.npy")
    assert emb_new.shape == emb_old.shape
    assert cosine(emb_new, emb_old) > 0.99, cosine(emb_new, emb_old)
    masks_new, masks_old = np.load(tmp_path / "golden" / "masks.int8.npy"), np.load(golden / "masks.int8.npy")
    assert masks_new.shape == masks_old.shape
    assert cosine(masks_new, masks_old) > 0.99, cosine(masks_new, masks_old)
    agree = float(np.mean((masks_new > 0) == (masks_old > 0)))
    assert agree > 0.97, agree
    iou_new, iou_old = np.load(tmp_path / "golden" / "iou.int8.npy"), np.load(golden / "iou.int8.npy")
    assert scaled_max_err(iou_new, iou_old) < 1e-3

    assert json.loads((tmp_path / "golden" / "cases.json").read_text()) == json.loads((golden / "cases.json").read_text())


def test_reference_fixtures_reproduce(tmp_path):
    """PIL's resized images are the same bytes; torch's logits the same to float rounding (its CPU
    kernels differ between machines in the last bits)."""
    from PIL import Image

    from tinysam_export.reference_fixtures import write_reference_fixtures

    write_reference_fixtures(tmp_path)
    committed = REPO / "tests" / "fixtures" / "reference"
    cases = json.loads((committed / "cases.json").read_text())
    assert json.loads((tmp_path / "cases.json").read_text())["resize"] == cases["resize"]
    for case in cases["resize"]:
        for key in ("input", "expected"):
            new, old = np.asarray(Image.open(tmp_path / case[key])), np.asarray(Image.open(committed / case[key]))
            assert np.array_equal(new, old), case[key]
    for case in cases["upsample"]:
        assert np.array_equal(np.load(tmp_path / case["low"]), np.load(committed / case["low"])), case["low"]
        new, old = np.load(tmp_path / case["expected"]), np.load(committed / case["expected"])
        assert scaled_max_err(new, old) < 1e-6, case["expected"]
