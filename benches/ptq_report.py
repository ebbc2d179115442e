"""Issue 17's quantization report: onnxruntime's statistics rule against the output-distance search.

Quantizes the FP32 encoder of a model directory (default `models/default`) both ways and reports,
for each variant, the share of encoder MACs in integer ops, embedding cosine, best-mask IoU,
IoU-score error and best-mask choice agreement against FP32 (FP32 decoder, the fixed prompts of
`validate.py` on the evaluation photos), plus the search's per-group output distances:

    models/.venv/bin/python benches/ptq_report.py [--model models/default] [--out benches]

Writes `ptq-results.md` and `ptq-results.json` in `--out`. ~20 min on 2 cores; the statistics
rule's calibration peaks at ~8.5 GB, the search's at ~5 GB.
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

from tinysam_export import ptq
from tinysam_export import quantize as q
from tinysam_export.build import encoder_feeds
from tinysam_export.config import CONFIGS
from tinysam_export.images import STATISTICS_PHOTOS, calibration_set, evaluation_set
from tinysam_export.validate import fidelity_report
from tinysam_export.weights import synthetic_model

STAGE0 = ("patch_embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.0.downsample")


def fidelity(cfg, model_dir: Path, int8_encoder: Path, photos) -> dict:
    fp32 = (model_dir / "encoder.fp32.onnx", model_dir / "decoder.fp32.onnx")
    report = fidelity_report(cfg, fp32, (int8_encoder, fp32[1]), photos)
    s = report["summary"]
    return {
        "integer_share": q.integer_mac_share(int8_encoder)["integer_share"],
        "embedding_cosine_mean": s["embedding_cosine_mean"],
        "embedding_cosine_min": s["embedding_cosine_min"],
        **{k: v for k, v in s["int8_encoder_fp32_decoder"].items() if k != "prompts"},
        "prompts": s["int8_encoder_fp32_decoder"]["prompts"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models/default")
    ap.add_argument("--out", type=Path, default=ROOT / "benches")
    args = ap.parse_args()
    started = time.monotonic()
    manifest = json.loads((args.model / "manifest.json").read_text())
    cfg = next((c for c in CONFIGS.values() if c.name == manifest["model"]), None)
    if cfg is None or manifest["weights"].get("kind") != "synthetic":
        raise SystemExit(f"{args.model}: needs a synthetic-weight model of a known configuration")
    model = synthetic_model(cfg, int(manifest["weights"]["seed"]))
    fp32 = args.model / "encoder.fp32.onnx"
    photos = evaluation_set()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        opts = ptq.SearchOptions(float_stem=True)
        calib = calibration_set(count=8)
        result = ptq.search(model, cfg, fp32, calib, opts)
        variants = {
            "search, stem float + groups over the budget (shipped)": sorted(set(result.float_groups) | set(STAGE0)),
            "search, stem float (the statistics rule's layers)": list(STAGE0),
            "search, patch embedding + first merge float": ["patch_embed", "layers.0.downsample"],
            "search, first merge float": ["layers.0.downsample"],
            "search, all integer": [],
        }
        for name, float_groups in variants.items():
            path = tmp / f"search-{len(rows)}.onnx"
            ptq.write_qoperator(fp32, path, [ly for ly in result.layers if ly.group not in float_groups])
            rows[name] = {"float_groups": list(float_groups), **fidelity(cfg, args.model, path, photos)}
        del model
        stats_calib = calibration_set(bundled_names=STATISTICS_PHOTOS)
        for name, options in {
            "statistics rule, stage 0 float (shipped before)": q.QuantOptions(rule="statistics"),
            "statistics rule, all integer": q.QuantOptions(rule="statistics", float_stem=False),
        }.items():
            path = tmp / f"statistics-{len(rows)}.onnx"
            q.quantize(fp32, path, encoder_feeds(cfg, stats_calib), options, options.encoder_calibration)
            rows[name] = {"float_groups": list(STAGE0) if options.float_stem else [], **fidelity(cfg, args.model, path, photos)}
    data = {
        "command": "models/.venv/bin/python benches/ptq_report.py",
        "date": time.strftime("%Y-%m-%d"),
        "model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else str(args.model),
        "evaluation_photos": [p.name for p in photos],
        "search_calibration_photos": [p.name for p in calib],
        "statistics_calibration_photos": [p.name for p in stats_calib],
        "search": ptq.report(result),
        "variants": rows,
        "seconds": round(time.monotonic() - started),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ptq-results.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# INT8 encoder: statistics rule vs output-distance search",
        "",
        (
            f"Made by `{data['command']}` on {data['date']} ({data['seconds']} s): `{data['model']}` (synthetic "
            "weights), INT8 encoder + FP32 decoder against all-FP32, onnxruntime, the fixed prompts of `validate.py` "
            f"on {len(photos)} evaluation photos ({', '.join(data['evaluation_photos'])})."
        ),
        "",
        "| variant | integer MAC share | embedding cosine mean (min) | best-mask IoU mean (min) | IoU-score error | best-mask agreement |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {100 * r['integer_share']:.1f} % | {r['embedding_cosine_mean']:.4f} ({r['embedding_cosine_min']:.4f}) "
            f"| {r['mean_mask_iou']:.3f} ({r['min_mask_iou']:.3f}) | {r['mean_iou_score_error']:.5f} "
            f"| {100 * r['best_mask_agreement']:.0f} % |"
        )
    s = data["search"]
    lines += [
        "",
        f"Search: calibration photos {', '.join(data['search_calibration_photos'])}; options {json.dumps(s['options'])}.",
        (
            "Output distance (normalised squared error of mask logits + IoU scores on the calibration prompts): "
            f"all integer {s['output_distance_all_integer']:.5f}, shipped {s['output_distance_shipped']:.5f}; "
            f"float groups: {', '.join(s['float_groups']) or 'none'}."
        ),
        "",
        "| layer group | output distance, quantized alone |",
        "|---|---|",
    ]
    lines += [f"| {g} | {d:.5f} |" for g, d in s["group_output_distance"].items()]
    (args.out / "ptq-results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
