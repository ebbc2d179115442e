#!/usr/bin/env python3
"""`tinysam segment` against SAM's reference pipeline on the same FP32 ONNX files: mask IoU.

The reference is what SAM's `SamPredictor` does around the model: `ResizeLongestSide` (PIL
bilinear on uint8), normalise and pad, the encoder and the one-graph decoder on onnxruntime, then
`postprocess_masks` (two bilinear `F.interpolate` steps with a crop between) and `> 0`. Ours is
the `tinysam segment` binary with `--encoder fp32 --decoder fp32 --all-masks`, one run per prompt.
Prompts: the fidelity report's fixed prompts (5 points, 2 boxes) on each photo, all 3 masks.

    models/.venv/bin/python benches/reference_masks.py [--images ../shared/images/*.jpg] \\
        [--model models/default] [--out benches/reference-masks-results.md]

Without `--images`: the photos in ../shared/images when present, else scikit-image's bundled ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

from tinysam_client.rle import decode_rle
from tinysam_export.config import CONFIGS
from tinysam_export.images import Prompt, fixed_prompts
from tinysam_export.reference_fixtures import sam_postprocess
from tinysam_export.validate import OnnxPipeline, mask_iou


def rle_decode(rle: dict) -> np.ndarray:
    """`tinysam segment`'s COCO compressed RLE -> H x W bool (the Python client's decoder)."""
    h, w = rle["size"]
    return np.frombuffer(decode_rle(rle["counts"], w, h), np.uint8).reshape(h, w).astype(bool)


def with_pad(prompt: Prompt) -> Prompt:
    """SAM's predictor adds a padding point (label -1) to prompts without a box."""
    if 2.0 in prompt.labels:
        return prompt
    return Prompt(
        prompt.name,
        np.vstack([prompt.coords, [[0.0, 0.0]]]),
        np.append(prompt.labels, -1.0),
    )


def cli_args(prompt: Prompt) -> list[str]:
    if 2.0 in prompt.labels:
        (x0, y0), (x1, y1) = prompt.coords
        return ["--box", f"{x0},{y0},{x1},{y1}"]
    args = []
    for (x, y), label in zip(prompt.coords, prompt.labels):
        args += ["--point", f"{x},{y},{int(label)}"]
    return args


def ours(
    binary: Path, model: Path, image: Path, prompt: Prompt, work: Path
) -> dict[int, np.ndarray]:
    """Mask index -> frame-size bool mask from `tinysam segment`."""
    prefix = work / "segment"
    cmd = [
        str(binary),
        "segment",
        str(image),
        *cli_args(prompt),
        "--all-masks",
        "--model",
        str(model),
    ]
    cmd += ["--encoder", "fp32", "--decoder", "fp32", "--out", str(prefix)]
    subprocess.run(
        cmd,
        check=True,
        capture_output=True,
        env={"RUST_LOG": "warn", "PATH": "/usr/bin:/bin"},
    )
    result = json.loads(prefix.with_suffix(".json").read_text())
    masks = result["prompts"][0]["masks"]
    return {int(m["index"]): rle_decode(m["rle"]) for m in masks}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=Path, nargs="*")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    p.add_argument(
        "--binary", type=Path, default=ROOT / "target" / "release" / "tinysam"
    )
    p.add_argument(
        "--out", type=Path, help="also append the Markdown report to this file"
    )
    p.add_argument(
        "--decode-with-pil",
        action="store_true",
        help="hand both pipelines the images as PIL decodes them (lossless PNG copies): compares the "
        "pre- and post-processing alone, without the two JPEG decoders' differences",
    )
    args = p.parse_args()
    images = args.images
    if not images:
        shared = sorted((ROOT.parent / "shared" / "images").glob("*.jpg"))
        images = shared or None
    manifest = json.loads((args.model / "manifest.json").read_text())
    cfg = (
        CONFIGS["test"]
        if manifest["config"]["image_size"] == CONFIGS["test"].image_size
        else CONFIGS["full"]
    )
    pipeline = OnnxPipeline.load(
        cfg, args.model / "encoder.fp32.onnx", args.model / "decoder.fp32.onnx"
    )
    rows = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if images is None:
            from tinysam_export.images import skimage_photos

            images = []
            for photo in skimage_photos(["astronaut", "coffee", "chelsea"]):
                path = work / f"{photo.name.split(':')[1]}.png"
                Image.fromarray(photo.rgb).save(path)
                images.append(path)
        if args.decode_with_pil:
            copies = []
            for image in images:
                copy = work / f"{Path(image).stem}.png"
                Image.open(image).convert("RGB").save(copy)
                copies.append(copy)
            images = copies
        for image in images:
            rgb = np.asarray(Image.open(image).convert("RGB"))
            h, w = rgb.shape[:2]
            embedding = pipeline.embed(rgb)
            for prompt in fixed_prompts(h, w):
                low, _ = pipeline.decode(embedding, [with_pad(prompt)], (h, w))
                mine = ours(args.binary, args.model, image, prompt, work)
                for k in range(low.shape[1]):
                    reference = sam_postprocess(low[0, k], (h, w), cfg.image_size) > 0
                    iou = mask_iou(reference, mine[k]) if k in mine else float("nan")
                    rows.append(
                        (
                            image.name,
                            f"{w}x{h}",
                            prompt.name,
                            k,
                            iou,
                            int(reference.sum()),
                        )
                    )
    ious = np.array([r[4] for r in rows])
    lines = [
        "# `tinysam segment` against SAM's reference pipeline",
        "",
        (
            f"Made by `models/.venv/bin/python benches/reference_masks.py"
            f"{' --images ' + ' '.join(str(i) for i in args.images) if args.images else ''}"
            f"{' --decode-with-pil' if args.decode_with_pil else ''}`"
            f" on {time.strftime('%Y-%m-%d')} (git {git_head()}), {time.time() - start:.0f} s."
        ),
        "",
        (
            f"Model `{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}` (FP32 encoder and"
            " one-graph decoder for the reference, the same files for ours). Every prompt's 3 masks."
        ),
        "",
        (
            f"**Mask IoU: min {ious.min():.5f}, mean {ious.mean():.5f}** over {len(rows)} masks"
            f" (target: >= 0.999 each)."
        ),
        "",
        "| image | size | prompt | mask | IoU | reference area |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {a} | {b} | {c} | {k} | {iou:.5f} | {area} |"
        for a, b, c, k, iou, area in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")
    return 0 if ious.min() >= 0.999 else 1


def git_head() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
