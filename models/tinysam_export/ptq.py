"""Output-distance post-training quantization of the image encoder (TinySAM §3.3).

What the generic rule in `quantize.py` does: activation ranges from min/max or percentile
statistics of each tensor, weight ranges from the weights, all chosen layer by layer without
looking at what the model is for. What this module does instead, as the TinySAM paper adapts
post-training quantization to promptable segmentation:

* **Every dense convolution and every weight product is integer**, the stem included: weights
  channel-wise for convolutions and layer-wise for linear layers, activations per tensor
  (QLinearConv / QLinearMatMul take one input scale). Depthwise convolutions stay float (the
  runtime has no int8 depthwise kernel; 1 % of the MACs), and so do the attention products of two
  activations, whose head-wise scales need the runtime's int8 attention (issue 21).
* **Scales are searched, not computed**: each scale is its tensor's absolute maximum times a
  clipping ratio from a geometric grid, and the ratios of a layer's input, weights (one per output
  channel for a convolution) and output are searched alternately for several rounds.
* **The search minimises the distance of the final outputs**: the mask logits and IoU scores for
  prompts sampled on the calibration images, each normalised by its variance. Evaluating the whole
  model for every candidate of every layer would take days on a CPU, so the distance is
  expanded to second order around the FP32 model: the change δ of a layer's output costs
  δᵀ Jᵀ J δ, with J the Jacobian of the normalised outputs to that layer's output, and the search
  uses the diagonal of Jᵀ J (a Gauss–Newton, "Hessian-guided" metric). That diagonal is estimated
  with random probes: for v ~ N(0, I) over the outputs, E[(Jᵀ v)²] = diag(Jᵀ J), one backward
  pass per probe.
* **Statistics stream**: per image, the calibration pass keeps only a random sample of each
  layer's input rows (im2col rows for 3x3 convolutions) with the probed squared gradients of the
  matching output rows, plus running absolute maxima; the autograd graph of one image is the
  largest allocation (~3 GB for the full model).
* **Layer groups over a budget stay float**: every group (the stem, each MBConv, each TinyViT
  block, each patch merging, the neck) is quantized alone with its searched scales and the true
  output distance measured end to end on the calibration images; groups whose distance exceeds
  the budget are kept float and named in the manifest.

The result is written as the same QOperator form `quantize.py` produces (QuantizeLinear ->
QLinearConv / QLinearMatMul -> DequantizeLinear), with our own scales: the runtime loads it
unchanged.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn
from tqdm import tqdm

from .config import ModelConfig
from .images import Photo, sampled_prompts
from .preprocess import preprocess, to_model_coords
from .quantize import materialize_shared_initializers
from .sam import Sam
from .tiny_vit import Conv2dBN
from .wrappers import DecoderGraph

log = logging.getLogger(__name__)

INT8_MIN, INT8_MAX = -128, 127


@dataclass(frozen=True)
class SearchOptions:
    """Knobs of the output-distance search; the defaults are what the shipped model uses."""

    prompts_per_image: int = 12
    probes: int = 2
    rows_per_image: int = 1024
    rounds: int = 2
    grid: tuple[float, ...] = tuple(round(0.9**k, 4) for k in range(22))
    # Largest normalised output distance (mean squared error of mask logits and IoU scores, each
    # over its FP32 variance) a layer group may cause on its own and stay integer.
    # On the synthetic default model the whole encoder in integer is 0.045 (best-mask IoU 0.83
    # against FP32), so 0.005 is about two points of IoU.
    group_budget: float = 0.005
    # Groups kept float whatever their distance (e.g. "patch_embed" for speed).
    float_groups: tuple[str, ...] = ()
    # Keep the stem (patch embedding and stage 0) float: until the runtime has int8 MBConv and
    # stem ops (issue 21), their integer form runs slower than the fused float ops.
    float_stem: bool = False
    seed: int = 0

    def to_dict(self) -> dict:
        """Plain-JSON form, for manifests."""
        return {
            "prompts_per_image": self.prompts_per_image,
            "probes": self.probes,
            "rows_per_image": self.rows_per_image,
            "rounds": self.rounds,
            "clipping_ratios": [min(self.grid), max(self.grid), len(self.grid)],
            "group_budget": self.group_budget,
            "forced_float_groups": list(self.float_groups),
            "float_stem": self.float_stem,
        }


@dataclass
class Layer:
    """One quantizable product of the encoder and the ONNX node it became."""

    path: str  # module path in the image encoder
    node: str  # ONNX node name
    op: str  # "Conv" or "MatMul"
    input: str
    output: str
    module: nn.Module
    group: str
    # Calibration statistics.
    rows: list[torch.Tensor] = field(default_factory=list)
    grad2: list[torch.Tensor] = field(default_factory=list)
    in_amax: float = 0.0
    out_amax: float = 0.0
    # Search results.
    in_scale: float | None = None
    weight_scale: torch.Tensor | None = None
    out_scale: float | None = None
    search_gain: float = 1.0

    @property
    def weight(self) -> torch.Tensor:
        """(Cout, K) in the row layout of the sampled inputs."""
        w = self.module.weight.detach()
        return w.reshape(w.shape[0], -1)

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias added inside the integer op (a convolution's); a linear layer's is a float Add."""
        b = self.module.bias if self.op == "Conv" else None
        return None if b is None else b.detach()

    @property
    def per_channel(self) -> bool:
        return self.op == "Conv"


def fold_batchnorms(encoder: nn.Module) -> nn.Module:
    """A copy of the encoder with every Conv2dBN's BatchNorm folded into its convolution, as the
    ONNX export folds it (the convolution then has a bias, the BatchNorm is an identity)."""
    encoder = copy.deepcopy(encoder).eval()
    for module in encoder.modules():
        if isinstance(module, Conv2dBN):
            fused = torch.nn.utils.fusion.fuse_conv_bn_eval(module.c, module.bn)
            module.c = fused
            module.bn = nn.Identity()
    return encoder


def _module_at(root: nn.Module, node_name: str) -> tuple[str, nn.Module] | None:
    """The module an exported node came from: node names are torch's scopes (`/encoder/layers.0/
    blocks.0/conv1/c/Conv`, `/encoder/patch_embed/seq/seq.0/c/Conv`), one per module level."""
    parts = node_name.strip("/").split("/")[1:-1]
    module, path = root, []
    for part in parts:
        for name in (part, part.split(".")[-1]):
            try:
                module = module.get_submodule(name)
            except AttributeError:
                continue
            path.append(name)
            break
        else:
            return None
    return ".".join(path), module


def layer_group(path: str) -> str:
    """The group a layer is kept float with: the stem, one MBConv or TinyViT block, one patch
    merging, or the neck."""
    parts = path.split(".")
    if parts[0] == "layers":
        return ".".join(parts[:4]) if parts[2] == "blocks" else ".".join(parts[:3])
    return parts[0]


def is_stem_group(group: str) -> bool:
    """Whether a layer group is part of the stem: the patch embedding or stage 0."""
    return group == "patch_embed" or group.startswith("layers.0.")


def quantizable_layers(encoder_onnx: onnx.ModelProto, encoder: nn.Module) -> list[Layer]:
    """Dense convolutions and weight products of the exported encoder, in graph order, with the
    module each came from."""
    inits = {i.name for i in encoder_onnx.graph.initializer}
    layers = []
    for node in encoder_onnx.graph.node:
        if node.op_type not in ("Conv", "MatMul") or node.input[1] not in inits:
            continue
        if node.op_type == "Conv" and next((a.i for a in node.attribute if a.name == "group"), 1) != 1:
            continue
        found = _module_at(encoder, node.name)
        if found is None or not isinstance(found[1], nn.Conv2d | nn.Linear):
            raise ValueError(f"cannot match ONNX node {node.name} to an encoder module")
        path, module = found
        layers.append(Layer(path, node.name, node.op_type, node.input[0], node.output[0], module, layer_group(path)))
    return layers


def _fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric int8 rounding as QuantizeLinear + DequantizeLinear do it (ties to even)."""
    return torch.clamp(torch.round(x / scale), INT8_MIN, INT8_MAX) * scale


def _int32_bias(bias: torch.Tensor, in_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    """A convolution's bias as QLinearConv holds it: int32 at the input x weight scale."""
    step = in_scale * w_scale
    return torch.round(bias / step) * step


def _input_rows(layer: Layer, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The sampled rows of a layer's input as the product sees them (im2col rows for a conv)."""
    if layer.op == "MatMul":
        return x.reshape(-1, x.shape[-1])[idx]
    conv = layer.module
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1):
        return x.flatten(2)[0, :, idx].T
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols[0, :, idx].T


def _output_rows(layer: Layer, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if layer.op == "MatMul":
        return y.reshape(-1, y.shape[-1])[idx]
    return y.flatten(2)[0, :, idx].T


def _row_count(layer: Layer, y: torch.Tensor) -> int:
    return y.reshape(-1, y.shape[-1]).shape[0] if layer.op == "MatMul" else y.shape[2] * y.shape[3]


class Calibration:
    """FP32 model with BatchNorms folded, hooks that sample each layer's rows, and the prompts."""

    def __init__(self, model: Sam, cfg: ModelConfig, layers_of: Callable[[nn.Module], list[Layer]], opts: SearchOptions):
        self.cfg = cfg
        self.opts = opts
        self.encoder = fold_batchnorms(model.image_encoder)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.decoder = DecoderGraph(model).eval()
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        self.layers = layers_of(self.encoder)
        self.rng = np.random.default_rng(opts.seed)
        self.gen = torch.Generator().manual_seed(opts.seed)

    def prompt_batches(self, photo: Photo) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Sampled prompts of one photo in model coordinates, batched by point count."""
        h, w = photo.rgb.shape[:2]
        by_n: dict[int, list] = {}
        for p in sampled_prompts(h, w, self.rng, self.opts.prompts_per_image):
            by_n.setdefault(len(p.labels), []).append(p)
        batches = []
        for group in by_n.values():
            coords = np.stack([to_model_coords(p.coords, h, w, self.cfg) for p in group]).astype(np.float32)
            labels = np.stack([p.labels for p in group]).astype(np.float32)
            batches.append((torch.from_numpy(coords), torch.from_numpy(labels)))
        return batches

    def decode(self, embedding: torch.Tensor, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m = self.cfg.low_res_mask_size
        no_mask, has_mask = torch.zeros(1, 1, m, m), torch.zeros(1)
        return [self.decoder(embedding, c, lab, no_mask, has_mask) for c, lab in batches]

    def sample(self, photos: list[Photo]) -> list[tuple[torch.Tensor, list]]:
        """Record every layer's sampled rows, squared output gradients and ranges on `photos`;
        returns each photo's (input tensor, prompt batches) for the end-to-end checks."""
        inputs = []
        for photo in tqdm(photos, desc="calibration pass", leave=False):
            x = torch.from_numpy(preprocess(photo.rgb, self.cfg))
            batches = self.prompt_batches(photo)
            self._sample_one(x, batches)
            inputs.append((x, batches))
        return inputs

    def _sample_one(self, x: torch.Tensor, batches) -> None:
        grads: dict[int, torch.Tensor] = {}
        handles = []

        def hook(i: int, layer: Layer):
            def forward_hook(module, args, y):
                inp = args[0].detach()
                n = _row_count(layer, y)
                idx = torch.randint(0, n, (min(self.opts.rows_per_image, n),), generator=self.gen)
                layer.rows.append(_input_rows(layer, inp, idx).contiguous())
                layer.in_amax = max(layer.in_amax, float(inp.abs().max()))
                pre_bias = y.detach() if layer.op == "Conv" or module.bias is None else y.detach() - module.bias
                layer.out_amax = max(layer.out_amax, float(pre_bias.abs().max()))
                grads[i] = torch.zeros(idx.numel(), y.shape[1] if layer.op == "Conv" else y.shape[-1])

                def grad_hook(g):
                    grads[i] += _output_rows(layer, g, idx) ** 2 / self.opts.probes

                y.register_hook(grad_hook)

            return forward_hook

        for i, layer in enumerate(self.layers):
            handles.append(layer.module.register_forward_hook(hook(i, layer)))
        try:
            x = x.clone().requires_grad_(True)
            embedding = self.encoder(x)
            outputs = self.decode(embedding, batches)
            masks = torch.cat([m.reshape(-1) for m, _ in outputs])
            scores = torch.cat([s.reshape(-1) for _, s in outputs])
            # Normalised distance: each output kind's squared error over its variance and count.
            wm = 1.0 / (masks.numel() * max(float(masks.detach().var()), 1e-12))
            ws = 1.0 / (scores.numel() * max(float(scores.detach().var()), 1e-12))
            for k in range(self.opts.probes):
                vm = torch.randn(masks.shape, generator=self.gen) * math.sqrt(wm)
                vs = torch.randn(scores.shape, generator=self.gen) * math.sqrt(ws)
                probe = (masks * vm).sum() + (scores * vs).sum()
                probe.backward(retain_graph=k + 1 < self.opts.probes)
        finally:
            for h in handles:
                h.remove()
        for i, layer in enumerate(self.layers):
            layer.grad2.append(grads[i])

    def reference_outputs(self, inputs) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        with torch.no_grad():
            return [self.decode(self.encoder(x), batches) for x, batches in inputs]


def _search_layer(layer: Layer, in_scale_fixed: float | None, opts: SearchOptions) -> None:
    """Alternating clipping-ratio search of one layer's input, weight and output scales."""
    x = torch.cat(layer.rows)
    g2 = torch.cat(layer.grad2)
    w = layer.weight
    b = layer.bias
    y_ref = x @ w.T + (b if b is not None else 0)
    w_amax = w.abs().amax(1) if layer.per_channel else w.abs().max().expand(w.shape[0])
    w_amax = torch.clamp(w_amax, min=1e-12)
    in_amax = max(layer.in_amax, 1e-12)
    out_amax = max(layer.out_amax, 1e-12)
    grid = torch.tensor(opts.grid)

    def product(in_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
        xq = _fake_quant(x, in_scale)
        wq = _fake_quant(w, w_scale[:, None])
        y = xq @ wq.T
        if b is not None:  # the int32 bias of QLinearConv, at the input x weight scale
            y = y + _int32_bias(b, in_scale, w_scale)
        return y

    def channel_loss(y: torch.Tensor, out_scale: float) -> torch.Tensor:
        return (g2 * (_fake_quant(y, out_scale) - y_ref) ** 2).sum(0)

    in_scale = in_scale_fixed if in_scale_fixed is not None else in_amax / INT8_MAX
    w_scale = w_amax / INT8_MAX
    out_scale = out_amax / INT8_MAX
    start = float(channel_loss(product(in_scale, w_scale), out_scale).sum())
    for _ in range(opts.rounds):
        if in_scale_fixed is None:
            losses = [float(channel_loss(product(float(r) * in_amax / INT8_MAX, w_scale), out_scale).sum()) for r in grid]
            in_scale = float(grid[int(np.argmin(losses))]) * in_amax / INT8_MAX
        per = torch.stack([channel_loss(product(in_scale, float(r) * w_amax / INT8_MAX), out_scale) for r in grid])
        if layer.per_channel:
            w_scale = grid[per.argmin(0)] * w_amax / INT8_MAX
        else:
            w_scale = float(grid[int(per.sum(1).argmin())]) * w_amax / INT8_MAX
        y = product(in_scale, w_scale)
        losses = [float(channel_loss(y, float(r) * out_amax / INT8_MAX).sum()) for r in grid]
        out_scale = float(grid[int(np.argmin(losses))]) * out_amax / INT8_MAX
    end = float(channel_loss(product(in_scale, w_scale), out_scale).sum())
    layer.in_scale, layer.weight_scale, layer.out_scale = in_scale, w_scale, out_scale
    layer.search_gain = end / start if start > 0 else 1.0
    layer.rows, layer.grad2 = [], []


def search_scales(layers: list[Layer], opts: SearchOptions) -> None:
    """Search every layer, in graph order; a tensor that another quantized layer produced keeps
    that layer's output scale (QOperator chains share it), and a tensor read by several layers
    keeps the first one's."""
    fixed: dict[str, float] = {}
    for layer in tqdm(layers, desc="scale search", leave=False):
        _search_layer(layer, fixed.get(layer.input), opts)
        fixed.setdefault(layer.input, layer.in_scale)
        fixed[layer.output] = layer.out_scale
        log.debug("%s: search kept %.3f of the max-range distance", layer.path, layer.search_gain)


class FakeQuant:
    """Installs the searched quantization on a set of layers for an end-to-end forward pass."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.handles = []
        # Each layer's float weight and integer-op bias (or None), restored on exit.
        self.saved: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def __enter__(self):
        for layer in self.layers:
            self.handles.append(layer.module.register_forward_pre_hook(self._pre(layer)))
            self.handles.append(layer.module.register_forward_hook(self._post(layer)))
            w, b = layer.module.weight, layer.bias
            self.saved.append((w.detach().clone(), None if b is None else b.clone()))
            shape = (-1,) + (1,) * (w.ndim - 1)
            with torch.no_grad():
                w.copy_(_fake_quant(w, layer.weight_scale.reshape(shape)))
                if b is not None:
                    layer.module.bias.copy_(_int32_bias(b, layer.in_scale, layer.weight_scale))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        with torch.no_grad():
            for layer, (w, b) in zip(self.layers, self.saved, strict=True):
                layer.module.weight.copy_(w)
                if b is not None:
                    layer.module.bias.copy_(b)

    @staticmethod
    def _pre(layer: Layer):
        def hook(module, args):
            return (_fake_quant(args[0], layer.in_scale),) + tuple(args[1:])

        return hook

    @staticmethod
    def _post(layer: Layer):
        def hook(module, args, y):
            if layer.op == "MatMul" and module.bias is not None:
                return _fake_quant(y - module.bias, layer.out_scale) + module.bias
            return _fake_quant(y, layer.out_scale)

        return hook


def output_distance(reference, candidate) -> float:
    """Mean over images of the normalised squared error of mask logits and IoU scores."""
    out = []
    for ref, cand in zip(reference, candidate, strict=True):
        rm = torch.cat([m.reshape(-1) for m, _ in ref])
        rs = torch.cat([s.reshape(-1) for _, s in ref])
        cm = torch.cat([m.reshape(-1) for m, _ in cand])
        cs = torch.cat([s.reshape(-1) for _, s in cand])
        dm = float(((cm - rm) ** 2).mean()) / max(float(rm.var()), 1e-12)
        ds = float(((cs - rs) ** 2).mean()) / max(float(rs.var()), 1e-12)
        out.append(dm + ds)
    return float(np.mean(out))


@dataclass
class SearchResult:
    """Scales of the integer layers, the float groups, and the measurements behind them."""

    layers: list[Layer]
    float_groups: list[str]
    group_distance: dict[str, float]
    distance_all: float
    distance_kept: float
    options: SearchOptions

    def integer_layers(self) -> list[Layer]:
        return [ly for ly in self.layers if ly.group not in self.float_groups]


def search(model: Sam, cfg: ModelConfig, encoder_onnx: Path, photos: list[Photo], opts: SearchOptions) -> SearchResult:
    """The whole search on `photos`: sampling pass, per-layer scale search, group sensitivity."""
    graph = onnx.load(str(encoder_onnx), load_external_data=False)
    materialize_shared_initializers(graph)
    torch.manual_seed(opts.seed)
    cal = Calibration(model, cfg, lambda enc: quantizable_layers(graph, enc), opts)
    groups: dict[str, list[Layer]] = {}
    for layer in cal.layers:
        groups.setdefault(layer.group, []).append(layer)
    unknown = sorted(set(opts.float_groups) - set(groups))
    if unknown:
        raise ValueError(f"no layer group named {', '.join(unknown)}; the groups are {', '.join(groups)}")
    log.info("output-distance search: %d layers on %d photos", len(cal.layers), len(photos))
    inputs = cal.sample(photos)
    search_scales(cal.layers, opts)
    reference = cal.reference_outputs(inputs)

    def distance(layers: list[Layer]) -> float:
        with FakeQuant(layers), torch.no_grad():
            return output_distance(reference, cal.reference_outputs(inputs))

    group_distance = {g: distance(ls) for g, ls in tqdm(groups.items(), desc="group sensitivity", leave=False)}
    float_groups = [
        g for g, d in group_distance.items()
        if d > opts.group_budget or g in opts.float_groups or (opts.float_stem and is_stem_group(g))
    ]
    distance_all = distance(cal.layers)
    integer = [ly for ly in cal.layers if ly.group not in float_groups]
    distance_kept = distance(integer) if float_groups else distance_all
    result = SearchResult(cal.layers, float_groups, group_distance, distance_all, distance_kept, opts)
    for g, d in group_distance.items():
        log.info("group %-24s output distance %.5f%s", g, d, "  (kept float)" if g in float_groups else "")
    log.info("all integer: %.5f; with %d group(s) float: %.5f", result.distance_all, len(float_groups), result.distance_kept)
    return result


def _i8(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.int8), name)


def _f32(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def write_qoperator(fp32: Path, out: Path, layers: list[Layer]) -> Path:
    """`fp32` with each of `layers` replaced by QuantizeLinear -> QLinearConv / QLinearMatMul ->
    DequantizeLinear at the searched scales; weights from the ONNX file itself."""
    model = onnx.load(str(fp32))
    materialize_shared_initializers(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    by_node = {ly.node: ly for ly in layers}
    nodes, new_inits = [], []
    for node in g.node:
        layer = by_node.get(node.name)
        if layer is None:
            nodes.append(node)
            continue
        base = node.name.strip("/").replace("/", "_")
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        ws = layer.weight_scale.numpy().astype(np.float32)
        if node.op_type == "Conv":
            wq = np.clip(np.rint(w / ws.reshape(-1, 1, 1, 1)), INT8_MIN, INT8_MAX)
            w_scale, w_zp = ws, np.zeros_like(ws, np.int8)
        else:  # MatMul weight is (K, N): one scale for the layer
            wq = np.clip(np.rint(w / ws[0]), INT8_MIN, INT8_MAX)
            w_scale, w_zp = np.float32(ws[0]), np.int8(0)
        names = {k: f"{base}_{k}" for k in ("x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "bias")}
        new_inits += [
            _f32(names["x_scale"], layer.in_scale), _i8(names["x_zp"], 0), _i8(names["w"], wq),
            _f32(names["w_scale"], w_scale), _i8(names["w_zp"], w_zp),
            _f32(names["y_scale"], layer.out_scale), _i8(names["y_zp"], 0),
        ]
        xq, yq = f"{base}_xq", f"{base}_yq"
        nodes.append(helper.make_node("QuantizeLinear", [node.input[0], names["x_scale"], names["x_zp"]], [xq],
                                      name=f"{node.name}_quantize"))
        q_inputs = [xq, names["x_scale"], names["x_zp"], names["w"], names["w_scale"], names["w_zp"],
                    names["y_scale"], names["y_zp"]]
        if node.op_type == "Conv":
            if len(node.input) > 2 and node.input[2]:
                bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
                bq = np.rint(bias / (np.float64(layer.in_scale) * ws.astype(np.float64)))
                new_inits.append(numpy_helper.from_array(bq.astype(np.int32), names["bias"]))
                q_inputs.append(names["bias"])
            nodes.append(helper.make_node("QLinearConv", q_inputs, [yq], name=f"{node.name}_quant",
                                          **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        else:
            nodes.append(helper.make_node("QLinearMatMul", q_inputs, [yq], name=f"{node.name}_quant"))
        nodes.append(helper.make_node("DequantizeLinear", [yq, names["y_scale"], names["y_zp"]], [node.output[0]],
                                      name=f"{node.name}_dequantize"))
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    used = {i for n in g.node for i in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    model.producer_version = ""
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def report(result: SearchResult) -> dict:
    """What the manifest and fidelity report say about the search."""
    return {
        "rule": "output-distance search (TinySAM PTQ)",
        "options": result.options.to_dict(),
        "integer_layers": len(result.integer_layers()),
        "float_groups": result.float_groups,
        "group_output_distance": result.group_distance,
        "output_distance_all_integer": result.distance_all,
        "output_distance_shipped": result.distance_kept,
        "layers": {
            ly.path: {
                "input_scale": ly.in_scale,
                "output_scale": ly.out_scale,
                "search_kept": ly.search_gain,
            }
            for ly in result.layers
        },
    }
