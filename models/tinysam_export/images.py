"""Real photographs for calibration and fidelity checks, with the prompts sampled on them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

SHARED_IMAGES = Path(__file__).resolve().parents[2].parent / "shared" / "images"
"""`../shared/images` beside the repository: the team's photos; absent in a user's fresh clone."""


class ImageError(Exception):
    """An image file that cannot be read as RGB."""


@dataclass(frozen=True)
class Photo:
    """A named RGB uint8 image."""

    name: str
    rgb: np.ndarray


def read_rgb(path: Path) -> Photo:
    """Read any PIL-readable file as RGB, or raise `ImageError` naming the file."""
    try:
        with Image.open(path) as im:
            return Photo(path.name, np.asarray(im.convert("RGB")))
    except (OSError, UnidentifiedImageError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from e


def skimage_photos(names: list[str]) -> list[Photo]:
    """Photos bundled in scikit-image's wheel (available offline); `stereo_motorcycle` is its
    left view."""
    from skimage import data

    def rgb(name: str) -> np.ndarray:
        image = getattr(data, name)()
        if isinstance(image, tuple):
            image = image[0]
        if image.ndim == 2:  # grey photos (camera, ...)
            image = np.stack([image] * 3, axis=-1)
        return np.ascontiguousarray(image[..., :3])

    return [Photo(f"skimage:{n}", rgb(n)) for n in names]


def shared_photos(folder: Path = SHARED_IMAGES) -> list[Photo]:
    """The team's photographs, or none (with a warning) where the folder is missing."""
    if not folder.is_dir():
        log.warning("no %s: calibrating on scikit-image's bundled photos only", folder)
        return []
    return [read_rgb(p) for p in sorted(folder.glob("*.jpg"))]


CALIBRATION_PHOTOS = ["astronaut", "coffee", "chelsea", "retina", "stereo_motorcycle"]
"""scikit-image photos the quantizer calibrates on, after the team's (none is in the evaluation set)."""


STATISTICS_PHOTOS = CALIBRATION_PHOTOS[:3]
"""scikit-image photos of the statistics rule (onnxruntime's calibrators keep every activation)."""


def calibration_set(
    extra: list[Path] | None = None, use_shared: bool = True, count: int | None = None,
    bundled_names: list[str] = CALIBRATION_PHOTOS,
) -> list[Photo]:
    """Photos the quantizer calibrates on: the team's, scikit-image's `bundled_names`, then
    `extra`; the first `count` of them (all without it). The user's `extra` photos are always kept."""
    own = [read_rgb(p) for p in extra or []]
    bundled = (shared_photos() if use_shared else []) + skimage_photos(bundled_names)
    if count is not None:
        bundled = bundled[: max(count - len(own), 0)]
    return bundled + own


def evaluation_set(use_shared: bool = True) -> list[Photo]:
    """Photos the fidelity report runs on: held-out scikit-image photos plus the shared ones."""
    held_out = skimage_photos(["rocket", "immunohistochemistry", "hubble_deep_field"])
    return held_out + (shared_photos() if use_shared else [])


@dataclass(frozen=True)
class Prompt:
    """Points (N, 2) in original-image pixels with labels (N,) as SAM defines them."""

    name: str
    coords: np.ndarray
    labels: np.ndarray


def fixed_prompts(height: int, width: int) -> list[Prompt]:
    """The fidelity report's fixed prompts: 5 single points and 2 boxes, relative to the image."""
    out = []
    for fx, fy in ((0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)):
        out.append(Prompt(f"point@{fx},{fy}", np.array([[fx * width, fy * height]]), np.array([1.0])))
    for name, (x0, y0, x1, y1) in (("box:centre", (0.25, 0.25, 0.75, 0.75)), ("box:wide", (0.05, 0.1, 0.95, 0.9))):
        out.append(
            Prompt(name, np.array([[x0 * width, y0 * height], [x1 * width, y1 * height]]), np.array([2.0, 3.0]))
        )
    return out


def sampled_prompts(height: int, width: int, rng: np.random.Generator, count: int) -> list[Prompt]:
    """Random calibration prompts: single points, point pairs with a negative, and boxes."""
    out = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            p = rng.uniform((0, 0), (width, height), size=(1, 2))
            out.append(Prompt("point", p, np.array([1.0])))
        elif kind == 1:
            p = rng.uniform((0, 0), (width, height), size=(2, 2))
            out.append(Prompt("points", p, np.array([1.0, 0.0])))
        else:
            a = rng.uniform((0, 0), (width * 0.6, height * 0.6))
            b = a + rng.uniform((width * 0.1, height * 0.1), (width * 0.4, height * 0.4))
            out.append(Prompt("box", np.stack([a, b]), np.array([2.0, 3.0])))
    return out
