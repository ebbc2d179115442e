"""Command line: `python -m tinysam_export {export,split-decoder,distill,fixtures,reference-fixtures} ...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import CONFIGS, TEACHER_CONFIGS
from .distill import DistillError
from .export import ExportError, one_line
from .images import ImageError
from .quantize import QuantOptions
from .validate import FidelityError
from .weights import CheckpointError

log = logging.getLogger("tinysam_export")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinysam_export", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="checkpoint or synthetic weights -> FP32 + INT8 ONNX, fidelity, manifest")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="tinysam.pth, tinysam_42.3.pth or mobile_sam.pt")
    src.add_argument("--synthetic", action="store_true", help="deterministic random weights (not a trained model)")
    e.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and prompt sampling")
    e.add_argument("--config", choices=sorted(CONFIGS), default="full", help="full TinySAM or the reduced test size")
    e.add_argument("--out", type=Path, required=True, help="output model directory")
    e.add_argument("--compact", action="store_true", help="keep both encoders but only the chosen decoder")
    e.add_argument("--decoder", choices=["auto", "int8", "fp32"], default="auto",
                   help="shipped decoder (auto: INT8 as the runtime quantizes the FP32 split decoder at load; "
                   "int8: the exported one-graph INT8 decoder, slow in tract; fp32)")
    e.add_argument("--quantization", choices=["search", "statistics"], default="search",
                   help="encoder scales: output-distance search (TinySAM's PTQ) or onnxruntime's statistics")
    e.add_argument("--calibration-images", type=int, default=8, metavar="N",
                   help="calibration photos of the search (statistics: at most 6)")
    e.add_argument("--float-group", action="append", default=[], metavar="GROUP",
                   help="search: keep this layer group float (patch_embed, layers.0.blocks.0, ..., neck)")
    e.add_argument("--per-channel", action="store_true", help="statistics: per-channel weight scales")
    e.add_argument("--calibration", choices=["minmax", "percentile", "entropy"], default="percentile",
                   help="statistics: encoder activation-range method (the decoder always uses min/max)")
    e.add_argument("--int8-stem", action="store_true",
                   help="quantize the encoder stem too (better for size, slower in the runtime until it has int8 MBConv)")
    e.add_argument("--calibration-image", type=Path, action="append", default=[], help="extra calibration photo")

    s = sub.add_parser("split-decoder", help="add the decoder's per-frame, per-prompt and mask graphs to a model directory")
    s.add_argument("--model", type=Path, required=True, help="model directory with manifest.json")
    s.add_argument("--checkpoint", type=Path, help="the checkpoint the directory was built from (not for synthetic weights)")

    d = sub.add_parser("distill", help="train a TinySAM student from a SAM-family teacher (full-stage distillation)")
    d.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint (sam_vit_h/l/b .pth, tinysam.pth ...)")
    d.add_argument("--teacher-arch", choices=list(TEACHER_CONFIGS), required=True, help="the teacher's architecture")
    d.add_argument("--images", type=Path, required=True, help="folder of training images (searched recursively)")
    d.add_argument("--out", type=Path, required=True, help="run folder: student.pth, state.pt, log.jsonl, summary.json")
    d.add_argument("--config", choices=sorted(CONFIGS), default="full", help="the student's size")
    d.add_argument("--init", type=Path, help="start from this TinySAM checkpoint instead of synthetic weights")
    d.add_argument("--seed", type=int, default=1, help="seed of the student's synthetic start, splits and prompts")
    d.add_argument("--decoder-init", choices=["teacher", "student"], default="teacher",
                   help="without --init: start the student's prompt encoder and decoder from the teacher's")
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--prompts-per-image", type=int, default=64)
    d.add_argument("--rounds", type=int, default=3, help="prompt rounds per image: 1 random, then hard-sampled points")
    d.add_argument("--box-fraction", type=float, default=0.5, help="share of prompts turned into boxes")
    d.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (cosine decay to a tenth)")
    d.add_argument("--embedding-weight", type=float, default=1.0, help="image-embedding distance (0: off)")
    d.add_argument("--token-weight", type=float, default=1.0, help="decoder output-token distance (0: off)")
    d.add_argument("--output-weight", type=float, default=1.0, help="mask and IoU output loss (0: off)")
    d.add_argument("--mask-loss", choices=["logits", "focal-dice"], default="logits",
                   help="distance of the mask logits, or SAM's focal + dice against the teacher's best mask")
    d.add_argument("--freeze-decoder", action="store_true",
                   help="train the image encoder only (the decoder's terms still shape it, through the frozen decoder)")
    d.add_argument("--val-images", type=Path, help="held-out images (default: a share of --images)")
    d.add_argument("--val-fraction", type=float, default=0.1, help="share of --images held out without --val-images")
    d.add_argument("--val-prompts", type=int, default=32, help="prompts per held-out image")
    d.add_argument("--cache", type=Path, help="teacher-embedding cache folder (default OUT/teacher-cache)")
    d.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    d.add_argument("--save-every", type=int, default=200, metavar="STEPS", help="resumable state every N images")
    d.add_argument("--restart", action="store_true", help="ignore a run already in --out and start over")

    f = sub.add_parser("fixtures", help="write the test-size models and golden tensors for the Rust tests")
    f.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests" / "fixtures")

    r = sub.add_parser(
        "reference-fixtures", help="write the golden outputs of SAM's reference resize (PIL) and mask upsampling (torch)"
    )
    r.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "reference"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "export" and args.calibration_images < 1:
        parser.error("--calibration-images must be at least 1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "export":
            from .build import BuildRequest, build

            manifest = build(
                BuildRequest(
                    cfg=CONFIGS[args.config],
                    out_dir=args.out,
                    checkpoint=args.checkpoint,
                    seed=args.seed,
                    quant=QuantOptions(
                        rule=args.quantization,
                        calibration_images=args.calibration_images,
                        float_groups=tuple(args.float_group),
                        per_channel=args.per_channel,
                        encoder_calibration=args.calibration,
                        float_stem=not args.int8_stem,
                    ),
                    keep_fp32=not args.compact,
                    decoder_precision=args.decoder,
                    extra_calibration=tuple(args.calibration_image),
                )
            )
            print(json.dumps(manifest["fidelity"], indent=2))
        elif args.command == "distill":
            from .distill import DistillOptions, LossWeights, distill

            summary = distill(
                DistillOptions(
                    teacher=args.teacher, teacher_arch=args.teacher_arch, images=args.images, out=args.out,
                    student_config=args.config, init=args.init, seed=args.seed, decoder_init=args.decoder_init,
                    epochs=args.epochs, prompts_per_image=args.prompts_per_image, rounds=args.rounds,
                    box_fraction=args.box_fraction, lr=args.lr,
                    weights=LossWeights(args.embedding_weight, args.token_weight, args.output_weight),
                    mask_loss=args.mask_loss, val_images=args.val_images, val_fraction=args.val_fraction,
                    val_prompts=args.val_prompts, cache=args.cache, device=args.device,
                    freeze_decoder=args.freeze_decoder, save_every=max(args.save_every, 1), restart=args.restart,
                )
            )
            print(json.dumps(summary, indent=2))
        elif args.command == "split-decoder":
            from .build import add_split_decoder

            add_split_decoder(args.model, args.checkpoint)
        elif args.command == "fixtures":
            from .fixtures import write_fixtures

            write_fixtures(args.out)
        elif args.command == "reference-fixtures":
            from .reference_fixtures import write_reference_fixtures

            write_reference_fixtures(args.out)
    except (CheckpointError, ImageError, FidelityError, ExportError, DistillError, ValueError) as e:
        log.error("%s", e)
        log.debug("traceback", exc_info=True)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as e:  # one line for the user; the traceback with --verbose
        log.error("%s (run with --verbose for the traceback)", one_line(e))
        log.debug("traceback", exc_info=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
