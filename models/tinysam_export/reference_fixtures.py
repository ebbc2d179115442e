"""Golden outputs of SAM's reference pre- and post-processing, for the Rust tests.

* **Resize:** `PIL.Image.resize((w, h), Image.BILINEAR)` on 8-bit RGB, as SAM's
  `ResizeLongestSide.apply_image` calls it (through torchvision's `resize` on a PIL image), to the
  longest-side size SAM computes. Inputs mix noise, gradients and saturated areas, at sizes that
  enlarge, reduce, keep one axis, and 1 x N.
* **Mask upsampling:** SAM's `postprocess_masks`: `F.interpolate` of the low-resolution logits to
  the model input size (bilinear, `align_corners=False`), crop of the padding, `F.interpolate` to
  the frame size, in float32.
* **JPEG decoding:** `Image.open(...).convert("RGB")` of JPEGs that Pillow wrote (4:2:0, 4:2:2,
  4:4:4, progressive, grey; odd sizes), as SAM's examples read a photo: Pillow's libjpeg-turbo
  decode, which the runtime reproduces pixel for pixel.

Deterministic: re-running `python -m tinysam_export reference-fixtures` rewrites the same files
(`tests/fixtures/reference/`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

from .preprocess import resized_size

log = logging.getLogger(__name__)

# (width, height, model size): enlarged, reduced, thin, 1 x N and N x 1 (one axis resized only),
# unchanged, mildly reduced.
RESIZE_CASES = [
    (37, 23, 64),
    (200, 131, 64),
    (300, 17, 64),
    (1, 50, 64),
    (50, 1, 64),
    (64, 64, 64),
    (65, 64, 64),
    (97, 61, 256),
    (1000, 7, 256),
    (70, 90, 64),
]

# (width, height, model size, mask side): the first six with SAM's 4x ratio of model size to mask
# side at a small scale, then the test model's sizes with the golden frame's size.
UPSAMPLE_CASES = [
    (40, 30, 64, 16),
    (100, 37, 64, 16),
    (1, 9, 64, 16),
    (9, 1, 64, 16),
    (64, 64, 64, 16),
    (17, 200, 64, 16),
    (200, 150, 256, 64),
    (33, 47, 256, 64),
]


# (width, height, chroma subsampling as Pillow's `subsampling` (0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0),
# quality, progressive, grey).
JPEG_CASES = [
    (97, 61, 2, 90, False, False),
    (33, 17, 1, 80, False, False),
    (64, 48, 0, 95, False, False),
    (200, 131, 2, 85, True, False),
    (45, 30, 2, 90, False, True),
]


def _test_image(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """H x W x 3 uint8: noise on the left, a gradient on the right, a black and a white bar."""
    noise = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], axis=-1)
    image = np.where((xx < width // 2)[..., None], noise, gradient.astype(np.uint8))
    image[: max(height // 8, 1) if height > 2 else 0] = 0
    image[height - height // 8 :] = 255
    return np.ascontiguousarray(image)


def _low_res_logits(side: int, rng: np.random.Generator) -> np.ndarray:
    """side x side float32 logits: a few smooth blobs plus noise, roughly +-12 like SAM's."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) / side
    logits = np.full((side, side), -6.0)
    for _ in range(4):
        cy, cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.3)
        logits += 14.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    logits += rng.normal(0.0, 1.5, size=logits.shape)
    return logits.astype(np.float32)


def sam_postprocess(low: np.ndarray, frame_hw: tuple[int, int], model_size: int) -> np.ndarray:
    """SAM's `postprocess_masks` for one m x m logit map -> frame-size float32 logits."""
    h, w = frame_hw
    rh, rw = resized_size(h, w, model_size)
    x = torch.from_numpy(low)[None, None]
    x = F.interpolate(x, (model_size, model_size), mode="bilinear", align_corners=False)
    x = x[..., :rh, :rw]
    x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False)
    return x[0, 0].numpy()


def write_reference_fixtures(out: Path) -> None:
    """Write the resize, upsampling and JPEG golden cases under `out` (`tests/fixtures/reference`)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(17)
    resize = []
    for width, height, size in RESIZE_CASES:
        image = _test_image(width, height, rng)
        nh, nw = resized_size(height, width, size)
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
        name = f"resize_{width}x{height}_to_{nw}x{nh}"
        Image.fromarray(image).save(out / f"{name}.in.png")
        Image.fromarray(resized).save(out / f"{name}.out.png")
        resize.append({"input": f"{name}.in.png", "expected": f"{name}.out.png", "model_size": size})
    upsample = []
    for width, height, size, side in UPSAMPLE_CASES:
        low = _low_res_logits(side, rng)
        logits = sam_postprocess(low, (height, width), size)
        name = f"upsample_{side}_to_{width}x{height}_via_{size}"
        np.save(out / f"{name}.low.npy", low)
        np.save(out / f"{name}.logits.npy", logits.astype(np.float32))
        upsample.append(
            {
                "low": f"{name}.low.npy",
                "expected": f"{name}.logits.npy",
                "width": width,
                "height": height,
                "model_size": size,
            }
        )
    jpeg = []
    for width, height, subsampling, quality, progressive, grey in JPEG_CASES:
        picture = Image.fromarray(_test_image(width, height, rng))
        if grey:
            picture = picture.convert("L")
        kind = "grey" if grey else f"sub{subsampling}" + ("_progressive" if progressive else "")
        name = f"jpeg_{width}x{height}_{kind}_q{quality}"
        options = {"quality": quality, "progressive": progressive}
        if not grey:
            options["subsampling"] = subsampling
        picture.save(out / f"{name}.jpg", **options)
        with Image.open(out / f"{name}.jpg") as written:
            decoded = np.asarray(written.convert("RGB"))
        Image.fromarray(decoded).save(out / f"{name}.decoded.png")
        jpeg.append({"input": f"{name}.jpg", "expected": f"{name}.decoded.png"})
    # A CMYK JPEG (Pillow writes Adobe's inverted CMYK): libjpeg does not convert it to RGB, so
    # the runtime decodes it otherwise; close to Pillow's conversion, not bit for bit.
    cmyk = Image.fromarray(_test_image(48, 32, rng)).convert("CMYK")
    cmyk.save(out / "jpeg_48x32_cmyk_q90.jpg", quality=90)
    with Image.open(out / "jpeg_48x32_cmyk_q90.jpg") as written:
        decoded = np.asarray(written.convert("RGB"))
    Image.fromarray(decoded).save(out / "jpeg_48x32_cmyk_q90.decoded.png")
    jpeg_cmyk = [{"input": "jpeg_48x32_cmyk_q90.jpg", "expected": "jpeg_48x32_cmyk_q90.decoded.png"}]
    cases = {
        "generated_by": "cd models && python -m tinysam_export reference-fixtures",
        "pillow": PIL.__version__,
        "torch": torch.__version__,
        "resize": resize,
        "upsample": upsample,
        "jpeg": jpeg,
        "jpeg_cmyk": jpeg_cmyk,
    }
    (out / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    log.info(
        "wrote %d resize, %d upsampling and %d JPEG cases under %s",
        len(resize),
        len(upsample),
        len(jpeg),
        out,
    )
