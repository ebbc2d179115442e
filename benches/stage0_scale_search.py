"""Can a search over activation clipping bring stage 0's INT8 fidelity back? (issues 17, 21)

`stage0_int8_study.py` found that putting stage 0's MBConv 1x1 convolutions in INT8 costs 2.3
points of mean best-mask IoU with the toolchain's calibration (per-tensor scales from
percentile statistics), and that per-channel weights do not help: the error is in the
activations. TinySAM's PTQ searches each layer's scales over a grid of clipping ratios against
the model's final outputs. This does that for the activations of stage 0's quantized
convolutions (their input and output scales), by coordinate descent over a ratio grid, scored by
the distance of the encoder's embedding to FP32's on the calibration photos, then reports the
fidelity of the tuned encoder on the evaluation photos (not used in the search):

    models/.venv/bin/python benches/stage0_scale_search.py [--rounds 2]

Appends its result to `benches/stage0-int8-results.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT / "benches"))

from stage0_int8_study import keep_float
from tinysam_export import quantize as q
from tinysam_export.build import encoder_feeds
from tinysam_export.config import CONFIGS
from tinysam_export.images import calibration_set, evaluation_set
from tinysam_export.preprocess import preprocess
from tinysam_export.validate import fidelity_report

RATIOS = [0.4, 0.55, 0.7, 0.85, 1.0, 1.2]


def stage0_scales(model: onnx.ModelProto) -> list[str]:
    """Names of the activation scales (inputs and outputs) of stage 0's quantized convolutions."""
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type == "QLinearConv" and "/layers.0/blocks." in node.name:
            for name in (node.input[1], node.input[6]):
                if name not in names:
                    names.append(name)
    return names


class Scorer:
    """Embedding distance of a quantized encoder to FP32's on fixed inputs."""

    def __init__(self, inputs: list[np.ndarray], references: list[np.ndarray]):
        self.inputs, self.references = inputs, references
        self.opts = ort.SessionOptions()
        self.opts.log_severity_level = 3

    def __call__(self, model: onnx.ModelProto) -> float:
        session = ort.InferenceSession(model.SerializeToString(), self.opts, providers=["CPUExecutionProvider"])
        err = 0.0
        for x, ref in zip(self.inputs, self.references):
            out = session.run(None, {"image": x})[0]
            err += float(np.mean((out - ref) ** 2) / np.mean(ref**2))
        return err / len(self.inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models/default")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--search-photos", type=int, default=3, help="calibration photos scored per step")
    args = ap.parse_args()
    manifest = json.loads((args.model / "manifest.json").read_text())
    cfg = next(c for c in CONFIGS.values() if c.name == manifest["config"]["name"])
    fp32_enc, fp32_dec = args.model / "encoder.fp32.onnx", args.model / "decoder.fp32.onnx"
    calib, photos = calibration_set(), evaluation_set()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.onnx"
        q.float_nodes = keep_float(["patch_embed", "merge"])
        options = q.QuantOptions(rule="statistics", float_stem=False)
        q.quantize(fp32_enc, base, encoder_feeds(cfg, calib), options, options.encoder_calibration)
        model = onnx.load(str(base))
        inits = {i.name: i for i in model.graph.initializer}
        names = stage0_scales(model)
        start = {n: numpy_helper.to_array(inits[n]).copy() for n in names}
        fp32 = ort.InferenceSession(str(fp32_enc), providers=["CPUExecutionProvider"])
        inputs = [preprocess(p.rgb, cfg) for p in calib[: args.search_photos]]
        refs = [fp32.run(None, {"image": x})[0] for x in inputs]
        score = Scorer(inputs, refs)

        def set_ratio(name: str, ratio: float) -> None:
            inits[name].CopyFrom(numpy_helper.from_array((start[name] * ratio).astype(np.float32), name))

        ratios = dict.fromkeys(names, 1.0)
        best = score(model)
        first = best
        print(f"{len(names)} activation scales; start error {best:.5f}", flush=True)
        for rnd in range(args.rounds):
            for name in names:
                for r in RATIOS:
                    if r == ratios[name]:
                        continue
                    set_ratio(name, r)
                    err = score(model)
                    if err < best:
                        best, ratios[name] = err, r
                set_ratio(name, ratios[name])
                print(f"round {rnd + 1} {name}: ratio {ratios[name]} error {best:.5f}", flush=True)
        tuned = Path(tmp) / "tuned.onnx"
        onnx.save(model, str(tuned))
        report = fidelity_report(cfg, (fp32_enc, fp32_dec), (tuned, fp32_dec), photos)["summary"]
        untuned = fidelity_report(cfg, (fp32_enc, fp32_dec), (base, fp32_dec), photos)["summary"]
    row = lambda s: (
        f"{s['embedding_cosine_mean']:.4f} ({s['embedding_cosine_min']:.4f}) | "
        f"{s['int8_encoder_fp32_decoder']['mean_mask_iou']:.3f} ({s['int8_encoder_fp32_decoder']['min_mask_iou']:.3f})"
    )
    text = (
        "\n## Clipping search on stage 0's activations\n\n"
        f"Made by `models/.venv/bin/python benches/stage0_scale_search.py --rounds {args.rounds}` on "
        f"{time.strftime('%Y-%m-%d')} ({round(time.time() - t0)} s): the \"MBConv 1x1 int8\" variant, each of its "
        f"{len(names)} stage-0 activation scales multiplied by the best of {RATIOS}, coordinate descent, "
        f"{args.rounds} round(s), scored by the embedding's relative squared error to FP32 on "
        f"{len(inputs)} calibration photos ({first:.5f} -> {best:.5f}); fidelity on the evaluation photos.\n\n"
        "| variant | embedding cosine mean (min) | best-mask IoU mean (min) |\n|---|---|---|\n"
        f"| MBConv 1x1 int8, calibrated scales | {row(untuned)} |\n"
        f"| MBConv 1x1 int8, searched scales | {row(report)} |\n\n"
        f"Ratios chosen: {json.dumps(ratios)}\n"
    )
    print(text)
    with open(ROOT / "benches/stage0-int8-results.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
