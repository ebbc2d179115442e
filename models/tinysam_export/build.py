"""One model directory end to end: weights -> FP32 ONNX -> INT8 ONNX -> fidelity -> manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__, ptq
from .config import ModelConfig
from .export import (
    DEFAULT_OPSET,
    ExportError,
    export_decoder,
    export_encoder,
    export_split_decoder,
    io_spec,
    one_line,
)
from .images import STATISTICS_PHOTOS, ImageError, Photo, calibration_set, evaluation_set, sampled_prompts
from .quantize import QuantOptions, integer_mac_share, quantize
from .validate import FidelityError, OnnxPipeline, check_fidelity, fidelity_report
from .weights import CheckpointError, file_sha256, load_checkpoint, synthetic_model

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
"""Version of manifest.json's layout; the Rust loader refuses others."""


@dataclass(frozen=True)
class BuildRequest:
    """What to build and where."""

    cfg: ModelConfig
    out_dir: Path
    checkpoint: Path | None = None
    seed: int = 0
    opset: int = DEFAULT_OPSET
    quant: QuantOptions = field(default_factory=QuantOptions)
    keep_fp32: bool = True
    # "auto": the runtime's INT8 decoder, the FP32 split decoder quantized at load (see
    # `decoder_choice`); "int8": the exported one-graph INT8 decoder; "fp32".
    decoder_precision: str = "auto"
    calibration_prompts: int = 24
    extra_calibration: tuple[Path, ...] = ()
    enforce_fidelity: bool = True
    use_shared_images: bool = True  # False: scikit-image photos only, reproducible anywhere


EXPECTED_ERRORS = (CheckpointError, ImageError, FidelityError, ExportError)
"""Errors that already say what went wrong in the user's terms."""


@contextmanager
def step(what: str):
    """Run one stage of a build: any unexpected exception (onnxruntime's, onnx's, torch's) comes
    out as an `ExportError` naming the stage and the cause in one line."""
    try:
        yield
    except EXPECTED_ERRORS:
        raise
    except MemoryError as e:
        raise ExportError(f"{what}: out of memory") from e
    except Exception as e:
        raise ExportError(f"{what}: {one_line(e)}") from e


def _replace_dir(staging: Path, out: Path) -> None:
    """Put the finished `staging` directory at `out`, replacing what was there only once the new
    one is complete (two renames on the same filesystem)."""
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def encoder_feeds(cfg: ModelConfig, photos: list[Photo]) -> Iterator[dict[str, np.ndarray]]:
    """Calibration inputs of the encoder."""
    from .preprocess import preprocess

    for photo in tqdm(photos, desc="calibrate encoder", leave=False):
        yield {"image": preprocess(photo.rgb, cfg)}


def decoder_feeds(pipe: OnnxPipeline, photos: list[Photo], count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Calibration inputs of the decoder: prompts sampled on each photo, batched by point count,
    plus one refinement step that feeds a predicted mask back as mask input."""
    rng = np.random.default_rng(seed)
    feeds = []
    for photo in tqdm(photos, desc="embed calibration photos", leave=False):
        hw = photo.rgb.shape[:2]
        emb = pipe.embed(photo.rgb)
        prompts = sampled_prompts(hw[0], hw[1], rng, count)
        by_n: dict[int, list] = {}
        for p in prompts:
            by_n.setdefault(len(p.labels), []).append(p)
        for group in by_n.values():
            feeds.append(pipe.decoder_feeds(emb, group, hw))
        masks, iou = pipe.decode(emb, prompts[:1], hw)
        best = masks[0, int(np.argmax(iou[0]))]
        feeds.append(pipe.decoder_feeds(emb, prompts[:1], hw, mask=best))
    return feeds


def split_decoder_paths(out: Path) -> dict[str, Path]:
    """Where a model directory keeps the decoder's per-frame, per-prompt and mask graphs, by role."""
    return {
        "decoder_frame": out / "decoder.frame.fp32.onnx",
        "decoder_prompt": out / "decoder.prompt.fp32.onnx",
        "decoder_masks": out / "decoder.masks.fp32.onnx",
    }


def decoder_choice(requested: str) -> tuple[str, bool]:
    """The shipped decoder precision for `--decoder` and whether the runtime quantizes it at load.

    "auto" is the runtime's INT8 decoder: the FP32 per-frame + per-prompt graphs (shipped here),
    with their largest products quantized as the runtime loads them (W8A16 on x86_64; f32 on
    aarch64, where that is no faster): ~14 % less time per prompt than the FP32 decoder at mask
    IoU 0.997 against it on the default model (`tinysam fidelity`,
    benches/fidelity-runtime-results.md). The exported one-graph INT8 decoder ("int8") is 4-50x
    slower in tract than the split FP32 decoder (benches/ptq-speed-results.md) and would take the
    quantized-at-load decoder's place, so "auto" does not ship it.
    """
    if requested == "auto":
        return "int8", True
    return requested, False


def fidelity_key(decoder_precision: str, at_load: bool) -> str:
    """The fidelity report's entry that gates an export: onnxruntime measures the exported INT8
    decoder, not the runtime's quantization at load, so with the latter the INT8 encoder with the
    FP32 decoder (the INT8 decoder's own loss is the runtime's to report: `tinysam fidelity`)."""
    if decoder_precision == "int8" and not at_load:
        return "int8_encoder_int8_decoder"
    return "int8_encoder_fp32_decoder"


def manifest_fidelity_key(manifest: dict) -> str:
    """`fidelity_key` of a written manifest: its default decoder is quantized at load when it is
    INT8 and the directory has no INT8 decoder file (as the runtime decides)."""
    files = {(f["role"], f["precision"]) for f in manifest["files"]}
    decoder = manifest["default"]["decoder"]
    at_load = decoder == "int8" and not any(p == "int8" and r.startswith("decoder") for r, p in files)
    return fidelity_key(decoder, at_load)


def split_decoder_entries(paths: dict[str, Path]) -> list[dict]:
    """Manifest entries of the split decoder graphs."""
    entries = []
    for role, path in paths.items():
        entry = {"role": role, "precision": "fp32", "path": path.name, "sha256": file_sha256(path)}
        entry.update(io_spec(path))
        entries.append(entry)
    return entries


def add_split_decoder(model_dir: Path, checkpoint: Path | None = None) -> dict:
    """Add the split decoder graphs to an existing model directory, from the weights its manifest
    names (synthetic seed, or `checkpoint`, whose SHA-256 must match), checked against the
    directory's one-graph FP32 decoder. Returns the updated manifest."""
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    from .config import CONFIGS

    cfg = next((c for c in CONFIGS.values() if c.name == manifest["model"]), None)
    if cfg is None:
        raise ValueError(f"{path}: unknown model {manifest['model']!r}")
    weights = manifest["weights"]
    if weights.get("kind") == "synthetic":
        model = synthetic_model(cfg, int(weights["seed"]))
    elif checkpoint is None:
        raise ValueError(f"{path}: the weights come from {weights.get('file')!r}; pass it as --checkpoint")
    elif file_sha256(checkpoint) != weights.get("sha256"):
        raise ValueError(f"{checkpoint} is not the checkpoint {path} was built from (SHA-256 differs)")
    else:
        model = load_checkpoint(cfg, checkpoint)
    split = split_decoder_paths(model_dir)
    # Exported next to the directory's files, moved in only when all three passed the check.
    with tempfile.TemporaryDirectory(prefix=".split-decoder-", dir=model_dir) as tmp:
        staged = split_decoder_paths(Path(tmp))
        with step("exporting the split FP32 decoder"):
            export_split_decoder(model, *staged.values(), model_dir / "decoder.fp32.onnx", manifest.get("opset", DEFAULT_OPSET))
        for role, staged_file in staged.items():
            os.replace(staged_file, split[role])
    manifest["files"] = [f for f in manifest["files"] if f["role"] not in split] + split_decoder_entries(split)
    staged_manifest = path.with_suffix(".json.partial")
    staged_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staged_manifest, path)
    return manifest


def build(req: BuildRequest) -> dict:
    """Build the model directory described by `req`; returns the manifest it wrote.

    The files are written to a hidden sibling directory that replaces `req.out_dir` only when
    the build has succeeded: a failed build leaves no half-written directory, and an existing
    one untouched. Failures raise one of `EXPECTED_ERRORS`, each naming its cause.
    """
    started = time.monotonic()
    out = req.out_dir
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    with step(f"creating {out.parent}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _build_into(req, staging)
        with step(f"moving the finished build to {out}"):
            _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s in %.0f s", out, time.monotonic() - started)
    return manifest


def _build_into(req: BuildRequest, out: Path) -> dict:
    """The build itself, into the empty directory `out`."""
    cfg = req.cfg
    if req.checkpoint is not None:
        model = load_checkpoint(cfg, req.checkpoint)
        weights = {"kind": "checkpoint", "file": req.checkpoint.name, "sha256": file_sha256(req.checkpoint)}
    else:
        log.info("building %s with synthetic weights (seed %d)", cfg.name, req.seed)
        model = synthetic_model(cfg, req.seed)
        weights = {
            "kind": "synthetic",
            "seed": req.seed,
            "note": "deterministic random weights of the exact architecture: not a trained model",
        }
    paths = {
        ("encoder", "fp32"): out / "encoder.fp32.onnx",
        ("decoder", "fp32"): out / "decoder.fp32.onnx",
        ("encoder", "int8"): out / "encoder.int8.onnx",
        ("decoder", "int8"): out / "decoder.int8.onnx",
    }
    log.info("exporting FP32 graphs")
    with step("exporting the FP32 encoder"):
        export_encoder(model, paths["encoder", "fp32"], req.opset)
    with step("exporting the FP32 decoder"):
        export_decoder(model, paths["decoder", "fp32"], req.opset)
    split = split_decoder_paths(out)
    with step("exporting the split FP32 decoder"):
        export_split_decoder(model, *split.values(), paths["decoder", "fp32"], req.opset)

    calib = calibration_set(list(req.extra_calibration), req.use_shared_images, req.quant.calibration_images)
    # onnxruntime's calibrators hold every activation of every photo: at most this many.
    statistics_calib = calibration_set(
        list(req.extra_calibration), req.use_shared_images, bundled_names=STATISTICS_PHOTOS
    )
    search_report = None
    if req.quant.rule == "search":
        log.info("searching quantization scales on %d calibration photos: %s", len(calib), ", ".join(p.name for p in calib))
        with step("searching the encoder's quantization scales"):
            result = ptq.search(
                model, cfg, paths["encoder", "fp32"], calib,
                ptq.SearchOptions(float_groups=req.quant.float_groups, float_stem=req.quant.float_stem, seed=req.seed),
            )
            ptq.write_qoperator(paths["encoder", "fp32"], paths["encoder", "int8"], result.integer_layers())
            search_report = ptq.report(result)
    del model
    if req.quant.rule != "search":
        log.info("quantizing on %d calibration photos: %s", len(statistics_calib), ", ".join(p.name for p in statistics_calib))
        with step("quantizing the encoder"):
            quantize(
                paths["encoder", "fp32"], paths["encoder", "int8"], encoder_feeds(cfg, statistics_calib), req.quant,
                req.quant.encoder_calibration,
            )
    with step("calibrating the decoder"):
        fp32_pipe = OnnxPipeline.load(cfg, paths["encoder", "fp32"], paths["decoder", "fp32"])
        dec_feeds = decoder_feeds(fp32_pipe, statistics_calib, req.calibration_prompts, req.seed)
    with step("quantizing the decoder"):
        quantize(
            paths["decoder", "fp32"], paths["decoder", "int8"], tqdm(dec_feeds, desc="calibrate decoder", leave=False),
            req.quant, req.quant.decoder_calibration,
        )

    log.info("measuring INT8 fidelity")
    with step("measuring INT8 fidelity"):
        report = fidelity_report(
            cfg,
            (paths["encoder", "fp32"], paths["decoder", "fp32"]),
            (paths["encoder", "int8"], paths["decoder", "int8"]),
            evaluation_set(req.use_shared_images),
        )
    decoder_precision, at_load = decoder_choice(req.decoder_precision)
    report["chosen"] = {"encoder": "int8", "decoder": decoder_precision}
    if at_load:
        report["chosen"]["decoder_form"] = "quantized at load"
    if search_report is not None:
        report["search"] = search_report
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    if req.enforce_fidelity:
        check_fidelity(report, fidelity_key(decoder_precision, at_load))

    files = []
    for (role, precision), path in paths.items():
        # Both encoders (the FP32 one is the fast path where tract's INT8 kernels are slow, see
        # README "Performance"); the decoder of the chosen precision, or every one with
        # keep_fp32; never the one-graph INT8 decoder when the runtime quantizes the FP32 split
        # decoder at load (a directory's INT8 decoder file is what `int8` loads).
        if role == "encoder":
            shipped = True
        elif at_load:
            shipped = precision == "fp32"
        else:
            shipped = req.keep_fp32 or precision == decoder_precision
        if not shipped:
            path.unlink()
            continue
        entry = {"role": role, "precision": precision, "path": path.name, "sha256": file_sha256(path)}
        entry.update(io_spec(path))
        if precision == "int8":
            entry["mac_share"] = integer_mac_share(path)
        files.append(entry)
    files.extend(split_decoder_entries(split))
    quantization = req.quant.to_dict()
    quantization["calibration_images"] = [p.name for p in (calib if search_report else statistics_calib)]
    if search_report is not None:
        quantization["search"] = {k: v for k, v in search_report.items() if k != "layers"}
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": cfg.name,
        "config": cfg.to_dict(),
        "weights": weights,
        "preprocess": {
            "input": "RGB, resized so the longest side is image_size (bilinear, antialiased), "
            "normalised (x - mean) / std per channel, zero-padded bottom/right to image_size^2, NCHW float32",
            "image_size": cfg.image_size,
            "pixel_mean": list(cfg.pixel_mean),
            "pixel_std": list(cfg.pixel_std),
        },
        "prompt": {
            "coords": "model-input pixels (x, y) after the resize, before padding",
            "labels": {"foreground": 1, "background": 0, "box_top_left": 2, "box_bottom_right": 3, "padding": -1},
            "mask_input_size": cfg.low_res_mask_size,
        },
        "default": {"encoder": "int8", "decoder": decoder_precision},
        "files": files,
        "quantization": quantization,
        "fidelity": report["summary"],
        "opset": req.opset,
        "tool": {"name": "tinysam_export", "version": __version__, "git_commit": _git_commit()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
