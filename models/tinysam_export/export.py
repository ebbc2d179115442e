"""Export the encoder and decoder graphs to FP32 ONNX and check them against PyTorch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .sam import Sam
from .validate import session
from .wrappers import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS, DecoderGraph, EncoderGraph

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


class ExportError(Exception):
    """An exported graph that fails the checker or disagrees with PyTorch."""


def one_line(e: BaseException) -> str:
    """`Type: first line of the message` (or just `Type`), for errors a user reads."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _export(module: torch.nn.Module, args: tuple, out: Path, inputs, outputs, dynamic_axes, opset: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(out), dynamo=False, opset_version=opset, input_names=inputs,
            output_names=outputs, dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    # Strip producer noise so re-exports are byte-stable and diffs stay meaningful.
    model.producer_version = ""
    onnx.save(model, str(out))
    return out


def encoder_example(model: Sam) -> torch.Tensor:
    """A deterministic input of the encoder's shape."""
    s = model.cfg.image_size
    return torch.linspace(-2, 2, 3 * s * s).reshape(1, 3, s, s)


def decoder_example(model: Sam, batch: int = 2, points: int = 3) -> tuple[torch.Tensor, ...]:
    """Deterministic decoder inputs with a non-trivial batch and point count."""
    cfg = model.cfg
    e, s = cfg.embedding_size, cfg.image_size
    emb = torch.linspace(-1, 1, cfg.prompt_embed_dim * e * e).reshape(1, cfg.prompt_embed_dim, e, e)
    coords = torch.linspace(0, s - 1, batch * points * 2).reshape(batch, points, 2)
    labels = torch.tensor([[1.0, 0.0, -1.0][i % 3] for i in range(batch * points)]).reshape(batch, points)
    mask = torch.zeros(1, 1, 4 * e, 4 * e)
    return emb, coords, labels, mask, torch.zeros(1)


@torch.no_grad()
def export_encoder(model: Sam, out: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write the FP32 encoder graph and check it against PyTorch (max abs < 1e-4 relative to scale)."""
    graph = EncoderGraph(model).eval()
    x = encoder_example(model)
    _export(graph, (x,), out, ENCODER_INPUTS, ENCODER_OUTPUTS, None, opset)
    _compare(out, {"image": x.numpy()}, [graph(x).numpy()])
    return out


@torch.no_grad()
def export_decoder(model: Sam, out: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write the FP32 decoder graph with dynamic prompt batch and point count, and check it."""
    graph = DecoderGraph(model).eval()
    args = decoder_example(model)
    axes = {
        "point_coords": {0: "batch", 1: "points"},
        "point_labels": {0: "batch", 1: "points"},
        "masks": {0: "batch"},
        "iou_predictions": {0: "batch"},
    }
    _export(graph, args, out, DECODER_INPUTS, DECODER_OUTPUTS, axes, opset)
    for batch, points in ((1, 1), (2, 3), (5, 2)):
        a = decoder_example(model, batch, points)
        _compare(out, dict(zip(DECODER_INPUTS, (t.numpy() for t in a))), [t.numpy() for t in graph(*a)])
    return out


@torch.no_grad()
def export_split_decoder(model: Sam, frame_out: Path, prompt_out: Path, masks_out: Path, reference: Path,
                         opset: int = DEFAULT_OPSET) -> None:
    """Write the decoder's per-frame, per-prompt and mask graphs and check that, chained, they give
    the outputs of the one-graph decoder `reference` (onnxruntime, 1e-4 scaled), with and without a
    mask input, at several batch and point counts."""
    from .split_decoder import (
        FRAME_INPUTS,
        FRAME_OUTPUTS,
        MASKS_INPUTS,
        MASKS_OUTPUTS,
        PROMPT_INPUTS,
        PROMPT_OUTPUTS,
        FrameGraph,
        MasksGraph,
        PromptGraph,
    )

    frame, prompt, masks = FrameGraph(model).eval(), PromptGraph(model).eval(), MasksGraph(model).eval()
    emb, coords, labels, mask, flag = decoder_example(model)
    _export(frame, (emb, mask, flag), frame_out, FRAME_INPUTS, FRAME_OUTPUTS, None, opset)
    per_prompt = {"point_coords": {0: "batch", 1: "points"}, "point_labels": {0: "batch", 1: "points"}}
    per_prompt.update({name: {0: "batch"} for name in PROMPT_OUTPUTS})
    prompt_args = (*frame(emb, mask, flag), coords, labels)
    _export(prompt, prompt_args, prompt_out, PROMPT_INPUTS, PROMPT_OUTPUTS, per_prompt, opset)
    batch_axes = {name: {0: "batch"} for name in MASKS_INPUTS + MASKS_OUTPUTS}
    _export(masks, prompt(*prompt_args)[:2], masks_out, MASKS_INPUTS, MASKS_OUTPUTS, batch_axes, opset)
    one = session(reference)
    frame_sess, prompt_sess, masks_sess = session(frame_out), session(prompt_out), session(masks_out)
    gen = torch.Generator().manual_seed(0)
    for batch, points, with_mask in ((1, 1, False), (2, 3, False), (5, 2, True)):
        emb, coords, labels, mask, flag = (t.numpy() for t in decoder_example(model, batch, points))
        emb = torch.randn(emb.shape, generator=gen).numpy()
        if with_mask:
            mask = (torch.randn(mask.shape, generator=gen) * 4).numpy()
            flag = np.ones(1, np.float32)
        want = one.run(None, dict(zip(DECODER_INPUTS, (emb, coords, labels, mask, flag))))
        per_frame = frame_sess.run(None, dict(zip(FRAME_INPUTS, (emb, mask, flag))))
        tokens, weights, iou = prompt_sess.run(None, dict(zip(PROMPT_INPUTS, (*per_frame, coords, labels))))
        (got_masks,) = masks_sess.run(None, dict(zip(MASKS_INPUTS, (tokens, weights))))
        for name, g, w in zip(DECODER_OUTPUTS, (got_masks, iou), want):
            err = float(np.max(np.abs(g - w))) / max(1.0, float(np.max(np.abs(w))))
            if g.shape != w.shape or err > 1e-4:
                raise ExportError(
                    f"split decoder: {name} ({g.shape}) differs from {reference.name} ({w.shape}) by {err:.2e} (scaled)"
                )
        log.info("split decoder matches %s at batch %d x %d points (mask input: %s)", reference.name, batch, points, with_mask)


def _compare(path: Path, feeds: dict[str, np.ndarray], expected: list[np.ndarray], atol: float = 1e-4) -> None:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    for name, g, e in zip([o.name for o in sess.get_outputs()], got, expected):
        if g.shape != e.shape:
            raise ExportError(f"{path.name}: output {name} has shape {g.shape}, PyTorch gives {e.shape}")
        # Mask logits reach +-50: compare relative to the output's scale.
        err = float(np.max(np.abs(g - e))) / max(1.0, float(np.max(np.abs(e))))
        if err > atol:
            raise ExportError(f"{path.name}: output {name} differs from PyTorch by {err:.2e} (scaled), limit {atol}")
        log.info("%s: %s matches PyTorch (scaled max abs %.1e)", path.name, name, err)


def io_spec(path: Path) -> dict:
    """Input/output names, element types and shapes (symbolic dims as names) of an ONNX file."""

    def dims(t) -> list:
        return [d.dim_param if d.dim_param else d.dim_value for d in t.type.tensor_type.shape.dim]

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return {
        "inputs": [{"name": i.name, "shape": dims(i)} for i in g.input if i.name not in inits],
        "outputs": [{"name": o.name, "shape": dims(o)} for o in g.output],
    }
