"""Which parts of the encoder's float stage 0 survive INT8: fidelity of encoder variants.

The shipped INT8 encoder keeps the patch embedding and stage 0 (MBConv blocks, patch merging) in
float: 19 % of its MACs and, with tract, ~40 % of the INT8 frame. This quantizes the default
model's FP32 encoder with the toolchain's own quantizer under several keep-float rules and
reports, per rule, the share of MACs in integer ops, embedding cosine and best-mask IoU against
FP32 (FP32 decoder, the fixed prompts of `validate.py`), so the runtime work follows the data:

    models/.venv/bin/python benches/stage0_int8_study.py [--model models/default] [--out DIR]

Writes `benches/stage0-int8-results.md` (and the JSON beside it). Takes ~5 min a variant on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

from tinysam_export import quantize as q
from tinysam_export.build import encoder_feeds
from tinysam_export.config import CONFIGS
from tinysam_export.images import calibration_set, evaluation_set
from tinysam_export.validate import fidelity_report

# Node-name parts of each group of stage 0's full (non-depthwise) convolutions.
GROUPS = {
    "patch_embed": ["/patch_embed/"],
    "mbconv": ["/layers.0/blocks."],
    "merge": ["/layers.0/downsample/"],
}
VARIANTS = {
    "shipped rule (stage 0 float)": (["patch_embed", "mbconv", "merge"], False),
    "MBConv 1x1 int8": (["patch_embed", "merge"], False),
    "MBConv + merge int8": (["patch_embed"], False),
    "all of stage 0 int8": ([], False),
    "MBConv 1x1 int8, per-channel weights": (["patch_embed", "merge"], True),
    "all of stage 0 int8, per-channel weights": ([], True),
}


def keep_float(float_groups: list[str]):
    """A `float_nodes` that keeps depthwise convs, attention products and `float_groups` float."""

    def rule(model, options):
        inits = {i.name for i in model.graph.initializer}
        keep = []
        for node in model.graph.node:
            if node.op_type == "Conv":
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                if group > 1 or any(p in node.name for g in float_groups for p in GROUPS[g]):
                    keep.append(node.name)
            if node.op_type == "MatMul" and not any(i in inits for i in node.input):
                keep.append(node.name)
        return keep

    return rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models/default")
    ap.add_argument("--out", type=Path, default=ROOT / "benches")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = ap.parse_args()
    manifest = json.loads((args.model / "manifest.json").read_text())
    cfg = next((c for c in CONFIGS.values() if c.name == manifest["config"]["name"]), None)
    if cfg is None:
        raise SystemExit(f"unknown config {manifest['config']['name']}")
    fp32_enc, fp32_dec = args.model / "encoder.fp32.onnx", args.model / "decoder.fp32.onnx"
    calib, photos = calibration_set(), evaluation_set()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (float_groups, per_channel) in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            t0 = time.time()
            out = Path(tmp) / "encoder.int8.onnx"
            q.float_nodes = keep_float(float_groups)
            options = q.QuantOptions(rule="statistics", per_channel=per_channel, float_stem=False)
            q.quantize(fp32_enc, out, encoder_feeds(cfg, calib), options, options.encoder_calibration)
            share = q.integer_mac_share(out)["integer_share"]
            report = fidelity_report(cfg, (fp32_enc, fp32_dec), (out, fp32_dec), photos)
            s = report["summary"]
            row = {
                "variant": name,
                "float_groups": float_groups,
                "per_channel": per_channel,
                "integer_mac_share": share,
                "embedding_cosine_mean": s["embedding_cosine_mean"],
                "embedding_cosine_min": s["embedding_cosine_min"],
                "mean_mask_iou": s["int8_encoder_fp32_decoder"]["mean_mask_iou"],
                "min_mask_iou": s["int8_encoder_fp32_decoder"]["min_mask_iou"],
                "seconds": round(time.time() - t0),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    (args.out / "stage0-int8-results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Stage 0 in INT8: fidelity by keep-float rule",
        "",
        (f"Made by `models/.venv/bin/python benches/stage0_int8_study.py` on {time.strftime('%Y-%m-%d')}: "
        f"`{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}` "
        f"({manifest['weights']['kind']} weights), the toolchain's quantizer (percentile calibration on "
        f"{len(calib)} photos), INT8 encoder + FP32 decoder against all-FP32 on {len(photos)} photos x the "
        "fixed prompts (onnxruntime)."),
        "",
        "| variant | integer MAC share | embedding cosine mean (min) | best-mask IoU mean (min) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {100 * r['integer_mac_share']:.1f} % | {r['embedding_cosine_mean']:.4f} "
            f"({r['embedding_cosine_min']:.4f}) | {r['mean_mask_iou']:.3f} ({r['min_mask_iou']:.3f}) |"
        )
    (args.out / "stage0-int8-results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
