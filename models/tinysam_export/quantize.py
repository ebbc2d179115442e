"""Static INT8 post-training quantization in the form tract runs on integer kernels.

Chosen form (measured against tract 0.23, see README "INT8 form"): onnxruntime QOperator graphs
(QLinearConv / QLinearMatMul) with symmetric signed 8-bit activations and weights, quantizing only
`Conv` and weight `MatMul`. Left in float on purpose: depthwise convolutions (tract runs quantized
depthwise as a slow grouped im2col), activation x activation attention matmuls, and every
element-wise op (tract has no QLinearAdd and friends).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantOptions:
    """Knobs of the quantizer; the defaults are the measured choice for tract.

    `rule` picks how the encoder's scales are found: "search" (the default) is the
    output-distance search of `ptq.py`, which quantizes the stem too and ignores the
    statistics-rule knobs below; "statistics" is onnxruntime's calibration with them.
    """

    rule: str = "search"
    calibration_images: int = 8
    # Layer groups the search keeps float whatever their error (e.g. "patch_embed").
    float_groups: tuple[str, ...] = ()
    per_channel: bool = False
    encoder_calibration: str = "percentile"  # or "minmax", "entropy"
    # Histogram methods need equal-shaped samples; decoder batches vary, so min/max there.
    decoder_calibration: str = "minmax"
    quantize_attention_matmuls: bool = False
    quantize_depthwise: bool = False
    # The stem (patch embedding + MBConv stage 0, ~17% of encoder MACs) stays float under both
    # rules: its int8 noise compounds through the whole encoder (the synthetic default model's
    # most sensitive layers, benches/ptq-results.md), and the runtime's fused float stem and
    # MBConv ops are faster than its integer form until issue 21 brings int8 ones.
    # `--int8-stem` quantizes it.
    float_stem: bool = True

    def to_dict(self) -> dict:
        """Plain-JSON form, for manifests."""
        if self.rule == "search":
            return {
                "format": "QOperator",
                "rule": "search",
                "op_types": ["Conv", "MatMul"],
                "activations": "int8 symmetric per-tensor, scales searched",
                "weights": "int8 symmetric, per-channel for Conv, per-tensor for MatMul, scales searched",
                "attention_matmuls": "float",
                "depthwise_conv": "float",
                "stem": "float" if self.float_stem else "int8",
                "decoder_calibration": self.decoder_calibration,
            }
        return {
            "format": "QOperator",
            "rule": "statistics",
            "op_types": ["Conv", "MatMul"],
            "activations": "int8 symmetric per-tensor",
            "weights": "int8 symmetric " + ("per-channel" if self.per_channel else "per-tensor"),
            "encoder_calibration": self.encoder_calibration,
            "decoder_calibration": self.decoder_calibration,
            "attention_matmuls": "int8" if self.quantize_attention_matmuls else "float",
            "depthwise_conv": "int8" if self.quantize_depthwise else "float",
            "stem": "float" if self.float_stem else "int8",
        }


class FeedReader(CalibrationDataReader):
    """Feeds a finite sequence of input dictionaries to the calibrator, with progress logging."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], label: str):
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)
        self._label = label
        self._count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        if feed is not None:
            self._count += 1
            log.debug("calibrating %s: sample %d", self._label, self._count)
        return feed


def is_stem(node_name: str) -> bool:
    """Whether a node belongs to the encoder's convolutional stem (patch embed + stage 0)."""
    return "/patch_embed/" in node_name or "/layers.0/" in node_name


def float_nodes(model: onnx.ModelProto, options: QuantOptions) -> list[str]:
    """Names of Conv/MatMul nodes to keep in float under `options`."""
    inits = {i.name for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Conv" and not options.quantize_depthwise:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:
                keep.append(node.name)
        if node.op_type == "Conv" and options.float_stem and is_stem(node.name):
            keep.append(node.name)
        weightless = not any(i in inits for i in node.input)
        if node.op_type == "MatMul" and not options.quantize_attention_matmuls and weightless:
            keep.append(node.name)
    return keep


def materialize_shared_initializers(model: onnx.ModelProto) -> int:
    """Give every tensor that is an `Identity` of an initializer its own initializer.

    torch.onnx merges identical initializers (all-zero biases of equal shape, as a freshly
    initialised checkpoint has) into one, read by the others through `Identity` nodes; the
    quantizer then looks those biases up as initializers, finds none and fails. Copies cost the
    duplicated bytes only. Returns how many `Identity` nodes were replaced.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    keep, copies = [], []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            copies.append(copy)
        else:
            keep.append(node)
    if copies:
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(copies)
    return len(copies)


def quantize(
    fp32: Path, out: Path, feeds: Iterable[dict[str, np.ndarray]], options: QuantOptions, calibration: str
) -> Path:
    """Quantize `fp32` into `out` with activation ranges calibrated on `feeds`."""
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prep.onnx"
        # No graph optimisation: it fuses MatMul+Add into Gemm, which QOperator can only express
        # as com.microsoft QGemm, an op tract does not have.
        quant_pre_process(str(fp32), str(prepped), skip_optimization=True, skip_symbolic_shape=True)
        model = onnx.load(str(prepped))
        shared = materialize_shared_initializers(model)
        if shared:
            log.info("%s: %d shared initializers given their own copies before quantizing", fp32.name, shared)
            onnx.save(model, str(prepped))
        exclude = float_nodes(model, options)
        method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[calibration]
        quantize_static(
            str(prepped),
            str(out),
            FeedReader(feeds, fp32.name),
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=["Conv", "MatMul"],
            per_channel=options.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=method,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    q = onnx.load(str(out))
    onnx.checker.check_model(q)
    q.producer_version = ""
    onnx.save(q, str(out))
    return out


def integer_mac_share(model_path: Path) -> dict:
    """MACs of Conv/MatMul-like nodes, split into integer (QLinear*) and float, from static shapes.

    Uses ONNX shape inference; nodes whose shapes are symbolic count with symbols set to 1.
    """
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    g = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        shapes[vi.name] = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    totals = {"integer": 0, "float": 0}
    per_op: dict[str, int] = {}
    for node in g.node:
        macs = 0
        op = node.op_type
        if op in ("Conv", "QLinearConv", "ConvTranspose"):
            w = shapes.get(node.input[3] if op == "QLinearConv" else node.input[1])
            y = shapes.get(node.output[0])
            if w and y:
                if op == "ConvTranspose":
                    x = shapes.get(node.input[0])
                    macs = int(np.prod(x)) * int(np.prod(w[1:])) if x else 0
                else:
                    macs = int(np.prod(y)) * int(np.prod(w[1:]))
        elif op in ("MatMul", "QLinearMatMul"):
            a = shapes.get(node.input[0])
            b = shapes.get(node.input[3] if op == "QLinearMatMul" else node.input[1])
            y = shapes.get(node.output[0])
            if a and b and y:
                macs = int(np.prod(y)) * a[-1]
        if macs:
            kind = "integer" if op.startswith("QLinear") else "float"
            totals[kind] += macs
            per_op[op] = per_op.get(op, 0) + macs
    total = totals["integer"] + totals["float"]
    return {
        "integer_macs": totals["integer"],
        "float_macs": totals["float"],
        "integer_share": totals["integer"] / total if total else 0.0,
        "per_op": per_op,
    }
