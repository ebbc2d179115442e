"""Command line: `python -m tinysam_export {export,fixtures} ...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import CONFIGS
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
                   help="shipped decoder precision (auto: the faster in the runtime, FP32 while only it has the split form)")
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
        elif args.command == "split-decoder":
            from .build import add_split_decoder

            add_split_decoder(args.model, args.checkpoint)
        elif args.command == "fixtures":
            from .fixtures import write_fixtures

            write_fixtures(args.out)
        elif args.command == "reference-fixtures":
            from .reference_fixtures import write_reference_fixtures

            write_reference_fixtures(args.out)
    except (CheckpointError, ImageError, FidelityError, ExportError, ValueError) as e:
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
