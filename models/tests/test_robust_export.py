"""A build either succeeds or fails with one line naming the cause, and never leaves a
half-written model directory; checkpoints whose biases torch.onnx merges still quantize."""

from __future__ import annotations

import logging

import onnx
import pytest
import torch

from tinysam_export import build as build_module
from tinysam_export.__main__ import main
from tinysam_export.build import BuildRequest, build
from tinysam_export.config import TEST
from tinysam_export.export import ExportError
from tinysam_export.quantize import QuantOptions
from tinysam_export.weights import synthetic_model


def fresh_init_checkpoint(path):
    """The test architecture as a freshly initialised checkpoint has it: every bias 0 and batch
    norms at their identity, so torch.onnx merges the equal folded biases into shared tensors."""
    state = synthetic_model(TEST, 0).state_dict()
    for key, value in state.items():
        if key.endswith((".bias", "running_mean")):
            value.zero_()
        elif key.endswith("running_var"):
            value.fill_(1.0)
    torch.save(state, path)
    return path


def test_checkpoint_with_shared_zero_biases_quantizes(tmp_path):
    ckpt = fresh_init_checkpoint(tmp_path / "fresh.pth")
    out = tmp_path / "model"
    # One calibration photo: what is tested is that the merged biases quantize, not the scales.
    manifest = build(BuildRequest(cfg=TEST, out_dir=out, checkpoint=ckpt, use_shared_images=False, enforce_fidelity=False,
                                  quant=QuantOptions(calibration_images=1)))
    fp32 = onnx.load(str(out / "encoder.fp32.onnx"))
    # The condition that made onnxruntime's quantizer fail is there...
    assert any(n.op_type == "Identity" for n in fp32.graph.node)
    # ...and the INT8 encoder was made and is a valid graph running on QLinear ops.
    int8 = onnx.load(str(out / "encoder.int8.onnx"))
    onnx.checker.check_model(int8)
    assert any(n.op_type == "QLinearConv" for n in int8.graph.node)
    assert manifest["weights"]["kind"] == "checkpoint"


def _failing_quantize(*args, **kwargs):
    raise RuntimeError("quantizer exploded\nsecond line of a long message")


def test_failed_build_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "quantize", _failing_quantize)
    out = tmp_path / "model"
    with pytest.raises(ExportError) as err:
        build(BuildRequest(cfg=TEST, out_dir=out, use_shared_images=False, quant=QuantOptions(rule="statistics")))
    assert str(err.value) == "quantizing the encoder: RuntimeError: quantizer exploded"
    assert list(tmp_path.iterdir()) == []


def test_failed_search_names_its_stage_and_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(build_module.ptq, "write_qoperator", _failing_quantize)
    out = tmp_path / "model"
    with pytest.raises(ExportError) as err:
        build(BuildRequest(cfg=TEST, out_dir=out, use_shared_images=False, quant=QuantOptions(calibration_images=1)))
    assert str(err.value) == "searching the encoder's quantization scales: RuntimeError: quantizer exploded"
    assert list(tmp_path.iterdir()) == []


def test_failed_build_keeps_the_previous_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "quantize", _failing_quantize)
    out = tmp_path / "model"
    out.mkdir()
    (out / "manifest.json").write_text("previous")
    with pytest.raises(ExportError):
        build(BuildRequest(cfg=TEST, out_dir=out, use_shared_images=False, quant=QuantOptions(rule="statistics")))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (out / "manifest.json").read_text() == "previous"


def test_cli_reports_unexpected_errors_in_one_line(tmp_path, monkeypatch, caplog):
    def explode(req):
        raise KeyError("some_tensor_name")

    monkeypatch.setattr(build_module, "build", explode)
    with caplog.at_level(logging.INFO):
        code = main(["export", "--synthetic", "--config", "test", "--out", str(tmp_path / "m")])
    assert code == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert errors[0].getMessage() == "KeyError: 'some_tensor_name' (run with --verbose for the traceback)"
