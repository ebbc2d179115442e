"""Write the Rust tests' fixtures: test-size models, golden tensors, RLE strings.

Everything is deterministic: synthetic seed-0 weights of the reduced configuration, a photo
bundled with scikit-image, fixed prompts. Re-running this reproduces the committed files.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .build import BuildRequest, build
from .config import TEST
from .images import Prompt, skimage_photos
from .preprocess import preprocess
from .quantize import QuantOptions
from .validate import OnnxPipeline

log = logging.getLogger(__name__)

FRAME_SIZE = (200, 150)
"""(width, height) of the golden frame: not square, so resize and padding are both exercised."""


def golden_frame() -> np.ndarray:
    """scikit-image's `coffee` photo resized to FRAME_SIZE, RGB uint8."""
    photo = skimage_photos(["coffee"])[0].rgb
    return np.asarray(Image.fromarray(photo).resize(FRAME_SIZE, Image.BILINEAR))


def golden_prompts() -> list[dict]:
    """Prompts in frame pixels, as the Rust test builds them: equal model point counts batch."""
    return [
        {"points": [[100.0, 75.0, 1]], "box": None},
        {"points": [[40.0, 30.0, 1]], "box": None},
        {"points": [[150.0, 100.0, 0]], "box": None},
        {"points": [], "box": [30.0, 20.0, 170.0, 130.0]},
        {"points": [[60.0, 60.0, 1], [120.0, 90.0, 0]], "box": None},
    ]


def _as_prompt(p: dict) -> Prompt:
    coords = [[x, y] for x, y, _ in p["points"]]
    labels = [float(l) for _, _, l in p["points"]]
    if p["box"] is not None:
        x0, y0, x1, y1 = p["box"]
        coords += [[x0, y0], [x1, y1]]
        labels += [2.0, 3.0]
    else:
        coords.append([0.0, 0.0])
        labels.append(-1.0)
    return Prompt("golden", np.array(coords, np.float64), np.array(labels))


def _rle_cases(out: Path) -> list[dict]:
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(7)
    cases = []
    for i, (h, w) in enumerate([(5, 7), (32, 24), (60, 90)]):
        m = np.zeros((h, w), np.uint8)
        if i == 0:
            m[1:4, 2:6] = 1
        else:
            for _ in range(4):
                y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
                m[y0 : y0 + rng.integers(2, h), x0 : x0 + rng.integers(2, w)] = 1
            m[0, 0] = 1
        name = f"rle_mask{i}.png"
        Image.fromarray(m * 255).save(out / name)
        rle = mask_utils.encode(np.asfortranarray(m))
        cases.append({"png": name, "width": w, "height": h, "counts": rle["counts"].decode("ascii"),
                      "area": int(mask_utils.area(rle))})
    return cases


def write_fixtures(out: Path) -> None:
    """Regenerate `tests/fixtures/` under `out`."""
    model_dir = out / "test_model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    # Everything that can be is quantized here (stem and attention products too, unlike the
    # shipped default) so the Rust kernel test sees a fully quantized graph; golden outputs are
    # per precision, so fidelity does not matter here.
    build(
        BuildRequest(
            cfg=TEST, out_dir=model_dir, seed=0, quant=QuantOptions(rule="statistics", float_stem=False, quantize_attention_matmuls=True), keep_fp32=True,
            decoder_precision="int8", enforce_fidelity=False, use_shared_images=False,
        )
    )
    golden = out / "golden"
    golden.mkdir(parents=True, exist_ok=True)
    frame = golden_frame()
    Image.fromarray(frame).save(golden / "frame.png")
    x = preprocess(frame, TEST)
    np.save(golden / "preprocessed.npy", x)
    prompts = golden_prompts()
    h, w = frame.shape[:2]
    for precision in ("fp32", "int8"):
        pipe = OnnxPipeline.load(TEST, model_dir / f"encoder.{precision}.onnx", model_dir / f"decoder.{precision}.onnx")
        emb = pipe.encoder.run(None, {"image": x})[0]
        np.save(golden / f"embedding.{precision}.npy", emb)
        single = [p for p in prompts if len(_as_prompt(p).labels) == 2]
        masks, iou = pipe.decode(emb, [_as_prompt(p) for p in single], (h, w))
        np.save(golden / f"masks.{precision}.npy", masks)
        np.save(golden / f"iou.{precision}.npy", iou)
    (golden / "cases.json").write_text(
        json.dumps(
            {
                "frame": "frame.png",
                "prompts": prompts,
                "batched_prompts": [i for i, p in enumerate(prompts) if len(_as_prompt(p).labels) == 2],
                "rle": _rle_cases(golden),
                "generated_by": "cd models && python -m tinysam_export fixtures",
            },
            indent=2,
        )
        + "\n"
    )
    log.info("wrote fixtures under %s", out)
