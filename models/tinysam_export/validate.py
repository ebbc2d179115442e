"""Run exported graphs with onnxruntime and measure INT8-vs-FP32 fidelity."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .config import ModelConfig
from .images import Photo, Prompt, fixed_prompts
from .preprocess import preprocess, resized_size, to_model_coords

log = logging.getLogger(__name__)

MIN_MEAN_MASK_IOU = 0.9
"""Below this mean INT8-vs-FP32 mask IoU the quantized model is rejected."""


class FidelityError(Exception):
    """Quantization changed the model's answers too much."""


def session(path: Path) -> ort.InferenceSession:
    """A single-threaded-deterministic CPU session."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class OnnxPipeline:
    """Encoder + decoder sessions with SAM's pre- and coordinate processing."""

    cfg: ModelConfig
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession

    @classmethod
    def load(cls, cfg: ModelConfig, encoder: Path, decoder: Path) -> OnnxPipeline:
        """Open both graphs."""
        return cls(cfg, session(encoder), session(decoder))

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        """(1, D, e, e) embedding of an RGB uint8 image."""
        return self.encoder.run(None, {"image": preprocess(rgb, self.cfg)})[0]

    def decoder_feeds(self, embedding: np.ndarray, prompts: list[Prompt], hw: tuple[int, int], mask=None) -> dict:
        """Decoder inputs for prompts of equal point count, as one batch."""
        h, w = hw
        coords = np.stack([to_model_coords(p.coords, h, w, self.cfg) for p in prompts]).astype(np.float32)
        labels = np.stack([p.labels for p in prompts]).astype(np.float32)
        m = self.cfg.low_res_mask_size
        mask_input = np.zeros((1, 1, m, m), np.float32) if mask is None else mask.reshape(1, 1, m, m)
        has_mask = np.array([0.0 if mask is None else 1.0], np.float32)
        return {
            "image_embeddings": embedding,
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": mask_input.astype(np.float32),
            "has_mask_input": has_mask,
        }

    def decode(self, embedding, prompts, hw, mask=None) -> tuple[np.ndarray, np.ndarray]:
        """Masks (B, 3, m, m) and IoU predictions (B, 3)."""
        masks, iou = self.decoder.run(None, self.decoder_feeds(embedding, prompts, hw, mask))
        return masks, iou


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two tensors, flattened."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _compare(reference: OnnxPipeline, candidate: OnnxPipeline, photo: Photo, ref_emb, cand_emb) -> list[dict]:
    h, w = photo.rgb.shape[:2]
    nh, nw = resized_size(h, w, reference.cfg.image_size)
    m = reference.cfg.low_res_mask_size
    rows, cols = max(1, round(nh * m / reference.cfg.image_size)), max(1, round(nw * m / reference.cfg.image_size))
    out = []
    for prompt in fixed_prompts(h, w):
        rm, ri = reference.decode(ref_emb, [prompt], (h, w))
        cm, ci = candidate.decode(cand_emb, [prompt], (h, w))
        best = int(np.argmax(ri[0]))
        out.append(
            {
                "prompt": prompt.name,
                "best_mask": best,
                "best_mask_agrees": int(np.argmax(ci[0])) == best,
                "mask_iou": mask_iou(rm[0, best, :rows, :cols] > 0, cm[0, best, :rows, :cols] > 0),
                "iou_score_error": float(abs(ri[0, best] - ci[0, best])),
            }
        )
    return out


def fidelity_report(
    cfg: ModelConfig, fp32: tuple[Path, Path], int8: tuple[Path, Path], photos: list[Photo]
) -> dict:
    """INT8 vs FP32 on every photo and fixed prompt, for INT8 encoder with INT8 and with FP32 decoder."""
    ref = OnnxPipeline.load(cfg, *fp32)
    q_both = OnnxPipeline.load(cfg, *int8)
    q_enc = OnnxPipeline(cfg, q_both.encoder, ref.decoder)
    images = []
    for photo in photos:
        ref_emb = ref.embed(photo.rgb)
        q_emb = q_both.embed(photo.rgb)
        images.append(
            {
                "image": photo.name,
                "size": list(photo.rgb.shape[:2]),
                "embedding_cosine": cosine(ref_emb, q_emb),
                "int8_encoder_int8_decoder": _compare(ref, q_both, photo, ref_emb, q_emb),
                "int8_encoder_fp32_decoder": _compare(ref, q_enc, photo, ref_emb, q_emb),
            }
        )
        log.info("fidelity %s: embedding cosine %.4f", photo.name, images[-1]["embedding_cosine"])

    def summary(key: str) -> dict:
        rows = [r for im in images for r in im[key]]
        ious = [r["mask_iou"] for r in rows]
        return {
            "mean_mask_iou": float(np.mean(ious)),
            "min_mask_iou": float(np.min(ious)),
            "mean_iou_score_error": float(np.mean([r["iou_score_error"] for r in rows])),
            "best_mask_agreement": float(np.mean([r["best_mask_agrees"] for r in rows])),
            "prompts": len(rows),
        }

    cos = [im["embedding_cosine"] for im in images]
    return {
        "threshold_mean_mask_iou": MIN_MEAN_MASK_IOU,
        "summary": {
            "embedding_cosine_mean": float(np.mean(cos)),
            "embedding_cosine_min": float(np.min(cos)),
            "int8_encoder_int8_decoder": summary("int8_encoder_int8_decoder"),
            "int8_encoder_fp32_decoder": summary("int8_encoder_fp32_decoder"),
        },
        "images": images,
    }


def check_fidelity(report: dict, key: str) -> None:
    """Raise `FidelityError` when the shipped combination (`key`, an entry of the report's
    summary) falls below the threshold."""
    got = report["summary"][key]["mean_mask_iou"]
    if got < MIN_MEAN_MASK_IOU:
        raise FidelityError(
            f"INT8 fidelity too low: mean mask IoU {got:.3f} < {MIN_MEAN_MASK_IOU} ({key}); "
            "try --per-channel or --calibration percentile"
        )
