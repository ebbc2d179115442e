"""Engines side by side on the same ONNX files: tract INT8 (on our int8 kernels, and on tract's own
for comparison) and FP32, onnxruntime INT8/FP32, PyTorch FP32.

    models/.venv/bin/python benches/compare.py                 # writes benches/compare-results.md
    models/.venv/bin/python benches/compare.py --threads 1 --runs 2 --batches 1,16

Every engine runs in its own process (so peak RSS is its own) on the same preprocessed image:
model-only timings, as `session.run` measures them (tract through `tinysam bench --json`). The
encoder gets one warm-up run and `--runs` timed runs; each decoder batch (B single-point prompts)
the same, but a measurement stops repeating after `--budget` seconds. PyTorch runs the encoder
only (eager, FP32, the synthetic-weight model rebuilt from the manifest's seed). MACs come from
the model toolchain's count in the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_inputs(model_dir: Path, image: Path | None):
    """The manifest's config and the preprocessed (1, 3, S, S) image."""
    from PIL import Image

    from tinysam_export.config import CONFIGS
    from tinysam_export.preprocess import preprocess, resized_size

    manifest = json.loads((model_dir / "manifest.json").read_text())
    cfg = next(c for c in CONFIGS.values() if c.name == manifest["config"]["name"])
    if image is not None:
        rgb = np.asarray(Image.open(image).convert("RGB"))
    else:  # the same 640x480 pattern as `tinysam bench`
        y, x = np.mgrid[0:480, 0:640]
        rgb = np.stack([x % 256, y % 256, ((x // 8 + y // 8) % 2) * 200], -1).astype(np.uint8)
    side = max(resized_size(rgb.shape[0], rgb.shape[1], cfg.image_size))
    return manifest, cfg, preprocess(rgb, cfg), side


def decoder_feeds(embedding: np.ndarray, batch: int, side: int, mask_size: int) -> dict[str, np.ndarray]:
    """B prompts of one foreground point plus the padding point, as `tinysam bench --json`."""
    coords = np.zeros((batch, 2, 2), np.float32)
    labels = np.tile(np.array([1.0, -1.0], np.float32), (batch, 1))
    for i in range(batch):
        coords[i, 0] = (side * ((i % 8) + 0.5) / 8.0, side * ((i // 8 % 8) + 0.5) / 8.0)
    return {
        "image_embeddings": embedding,
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": np.zeros((1, 1, mask_size, mask_size), np.float32),
        "has_mask_input": np.zeros((1,), np.float32),
    }


def timed(runs: int, budget: float, f) -> list[float]:
    times, start = [], time.perf_counter()
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start > budget:
            break
    return times


def worker_onnxruntime(args) -> dict:
    import onnxruntime as ort

    _manifest, cfg, image, side = load_inputs(args.model, args.image)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    t = time.perf_counter()
    enc = ort.InferenceSession(str(args.model / f"encoder.{args.precision}.onnx"), opts, providers=["CPUExecutionProvider"])
    split = args.variant == "split"
    # The decoder of this precision where the directory has one, else FP32 (as `tinysam bench`).
    dec_precision = args.precision if (args.model / f"decoder.{args.precision}.onnx").exists() else "fp32"
    if split:  # the per-frame + per-prompt pair, as tract's default decoder runs them
        frame = ort.InferenceSession(str(args.model / f"decoder.frame.{dec_precision}.onnx"), opts, providers=["CPUExecutionProvider"])
        masks = ort.InferenceSession(str(args.model / f"decoder.masks.{dec_precision}.onnx"), opts, providers=["CPUExecutionProvider"])
        dec_path = args.model / f"decoder.prompt.{dec_precision}.onnx"
    else:
        dec_path = args.model / f"decoder.{dec_precision}.onnx"
    dec = ort.InferenceSession(str(dec_path), opts, providers=["CPUExecutionProvider"])
    load_ms = (time.perf_counter() - t) * 1e3
    embedding = enc.run(None, {"image": image})[0]  # warm-up
    encoder_ms = timed(args.runs, args.budget, lambda: enc.run(None, {"image": image}))
    decoder_ms = {}
    frame_ms = None
    if split:
        frame_feeds = decoder_feeds(embedding, 1, side, cfg.low_res_mask_size)
        frame_feeds = {k: frame_feeds[k] for k in ("image_embeddings", "mask_input", "has_mask_input")}
        per_frame = frame.run(None, frame_feeds)
        frame_ms = timed(args.runs, args.budget, lambda: frame.run(None, frame_feeds))
    for b in args.batches:
        feeds = decoder_feeds(embedding, b, side, cfg.low_res_mask_size)
        if split:
            feeds = dict(zip((o.name for o in frame.get_outputs()), per_frame),
                         point_coords=feeds["point_coords"], point_labels=feeds["point_labels"])
        if split:
            def run(feeds=feeds):
                tokens, weights, _ = dec.run(None, feeds)
                return masks.run(None, {"prompt_image_tokens": tokens, "mask_weights": weights})
        else:
            def run(feeds=feeds):
                return dec.run(None, feeds)
        t = time.perf_counter()
        run()  # warm-up
        first = (time.perf_counter() - t) * 1e3
        decoder_ms[str(b)] = [first] if first > args.budget * 1e3 else timed(args.runs, args.budget, run)
    return {
        "engine": "onnxruntime",
        "version": ort.__version__,
        "encoder_precision": args.precision,
        "decoder_precision": dec_precision,
        "threads": args.threads,
        "load_ms": load_ms,
        "encoder_ms": encoder_ms,
        "decoder_ms": decoder_ms,
        "decoder_form": "per-frame + per-prompt" if split else "one graph",
        "decoder_frame_ms": frame_ms,
        "peak_rss_mib": peak_rss_mib(),
    }


def worker_torch(args) -> dict:
    import torch

    from tinysam_export.weights import synthetic_model
    from tinysam_export.wrappers import EncoderGraph

    manifest, cfg, image, _ = load_inputs(args.model, args.image)
    torch.set_num_threads(args.threads)
    weights = manifest["weights"]
    if weights.get("kind") != "synthetic":
        raise SystemExit("the PyTorch run rebuilds synthetic weights; this model came from a checkpoint")
    t = time.perf_counter()
    encoder = EncoderGraph(synthetic_model(cfg, int(weights["seed"]))).eval()
    load_ms = (time.perf_counter() - t) * 1e3
    x = torch.from_numpy(image)
    with torch.inference_mode():
        encoder(x)  # warm-up
        encoder_ms = timed(args.runs, args.budget, lambda: encoder(x))
    return {
        "engine": "pytorch",
        "version": torch.__version__,
        "encoder_precision": "fp32",
        "decoder_precision": None,
        "threads": args.threads,
        "load_ms": load_ms,
        "encoder_ms": encoder_ms,
        "decoder_ms": {},
        "peak_rss_mib": peak_rss_mib(),
    }


def run_engine(args, engine: str, precision: str, threads: int, variant: str = "", decoder: str = "") -> dict | None:
    """One engine in its own process; for tract, `variant` picks the int8 matmul (`--int8-matmul`)
    and `decoder` the decoder form (`--decoder-graph`); for onnxruntime, variant `split` runs the
    per-frame + per-prompt decoder pair instead of the one-graph decoder."""
    common = ["--runs", str(args.runs), "--batches", ",".join(map(str, args.batches))]
    if engine == "tract":
        cmd = [str(args.tinysam), "bench", "--json", "-", "--model", str(args.model), "--precisions", precision,
               "--threads", str(threads), "--budget-s", str(args.budget),
               "--int8-matmul", variant or "auto", "--decoder-graph", decoder or "auto"] + common
        if args.image:
            cmd += ["--image", str(args.image)]
    else:
        cmd = [sys.executable, __file__, "--worker", engine, "--precision", precision, "--threads", str(threads),
               "--model", str(args.model), "--budget", str(args.budget), "--variant", variant] + common
        if args.image:
            cmd += ["--image", str(args.image)]
    print(f"  {engine} {precision} {variant}, {threads} thread(s) ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    env = dict(os.environ, RUST_LOG="warn")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {engine} {precision} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"engine": engine, "variant": variant, "decoder": decoder, "encoder_precision": precision, "threads": threads,
                "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout)
    result["variant"] = variant
    result["decoder"] = decoder
    if engine == "tract":
        result["version"] = locked_version("tract-onnx")
    print(f"    done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return result


def cpu_description() -> tuple[str, str, float | None]:
    """CPU model, the SIMD flags that matter here, and the clock in MHz (if reported)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
    wanted = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16"]
    have = set(flags.group(1).split()) if flags else set()
    shown = " ".join(f for f in wanted if f in have)
    missing = " ".join(f for f in ["avx512f", "avx512_vnni", "amx_int8"] if f not in have)
    desc = f"{shown}" + (f" (no {missing})" if missing else "")
    return (model.group(1).strip() if model else platform.machine()), desc, (float(mhz.group(1)) if mhz else None)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_runs(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.1f} (1 run)"
    return f"{median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f}, n={len(xs)})"


def report(args, results: list[dict], manifest: dict, elapsed_s: float) -> str:
    cpu, flags, mhz = cpu_description()
    files = {(f["role"], f["precision"]): f for f in manifest["files"]}
    enc_share = files.get(("encoder", "int8"), {}).get("mac_share", {})
    dec_share = files.get(("decoder", "int8"), {}).get("mac_share", {})
    enc_macs = enc_share.get("integer_macs", 0) + enc_share.get("float_macs", 0)
    dec_macs = dec_share.get("integer_macs", 0) + dec_share.get("float_macs", 0)
    tract_isa = next((r.get("isa") for r in results if r.get("isa")), "?")
    ceiling = os.environ.get("TINYSAM_ISA", "")
    lines = [
        "# Engines side by side",
        "",
        (f"Made by `{'TINYSAM_ISA=' + ceiling + ' ' if ceiling else ''}"
         f"{' '.join(['models/.venv/bin/python', 'benches/compare.py'] + args.argv)}` on "
         f"{datetime.now(timezone.utc):%Y-%m-%d} (git {git_rev()}), {elapsed_s / 60:.0f} min."),
        "",
        (f"- Model: `{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}` "
         f"({manifest['config']['name']}, weights: {manifest['weights'].get('kind')}); the same ONNX files for every "
         f"engine. Image: `{args.image or 'synthetic 640x480 pattern'}`."),
        f"- CPU: {cpu}, {os.cpu_count()} cores visible"
        + (f", {mhz:.0f} MHz reported" if mhz else "")
        + f". SIMD flags: {flags}. tract ISA: {tract_isa}.",
        (f"  (`TINYSAM_ISA={ceiling}`: our ops and kernels capped at {ceiling}, whatever the CPU has;"
         " tract's and onnxruntime's own kernels are not.)"
         if ceiling and ceiling != "native" else
         "  (AVX-512 VNNI present: our int8 products run on `vpdpbusd`, tract's FP32 on AVX-512.)"
         if "avx512_vnni" in flags.split("(")[0] else
         "  (No AVX-512 VNNI exposed here: our int8 products run on AVX2 `vpmaddwd`.)"),
        f"- MACs (model toolchain's count): encoder {enc_macs / 1e9:.1f} GMAC per frame "
        f"({enc_share.get('integer_share', 0) * 100:.0f} % in quantized ops in the INT8 file); "
        + (f"decoder {dec_macs / 1e9:.2f} GMAC per prompt." if dec_macs else
           "decoder: not counted (the directory has no INT8 decoder file; tract's INT8 row runs the "
           "FP32 split decoder quantized at load, its largest products on the W8A16 kernels: "
           "`tinysam info --decoder int8` counts them)."),
    ]
    lanes = 16 if "avx512f" in flags.split("(")[0] else 8
    if mhz:
        peak = 2 * lanes * mhz / 1e3  # 2 FMA pipes x f32 lanes per cycle, per core
        lines.append(
            f"- Peak (per core, from the reported clock): f32 {peak:.0f} GMAC/s (2 FMA x {lanes} lanes); int8 "
            + (f"on AVX-512 VNNI about {4 * peak:.0f} GMAC/s (vpdpbusd: 64 MACs per instruction, 2 per cycle). "
               if lanes == 16 else
               f"on AVX2 about {2 * peak:.0f} GMAC/s (vpmaddubsw/vpmaddwd: 16 MACs per instruction, 2 per cycle). ")
            + "'% peak' below is against the f32 peak x threads."
        )
    lines.append("")
    for threads in args.threads:
        rows = [r for r in results if r.get("threads") == threads]
        lines += [f"## {threads} thread(s)", ""]
        header = "| engine | precision | encoder ms median (min-max, n) | encoder GMAC/s | % f32 peak |"
        rule = "|---|---|---|---|---|"
        for b in args.batches:
            header += f" decoder b={b} ms per prompt |"
            rule += "---|"
        header += " decoder per frame ms | peak RSS MiB | load ms |"
        rule += "---|---|---|"
        lines += [header, rule]
        for r in rows:
            name = f"{r['engine']} {r.get('version', '')}".strip()
            if r["engine"] == "tract" and r["encoder_precision"] == "int8":
                name += " (tract's int8 kernels)" if r.get("variant") == "tract" else " (our int8 kernels)"
            if r["engine"] == "tract" and r.get("decoder") == "one-graph":
                name += " (one-graph decoder)"
            if r["engine"] == "tract" and r.get("decoder") == "split-full-rank":
                name += " (split decoder, full-rank upscaling)"
            if "error" in r:
                lines.append(f"| {name} | {r['encoder_precision']} | failed: {r['error']} |")
                continue
            enc = median(r["encoder_ms"])
            gmacs = enc_macs / (enc / 1e3) / 1e9 if enc_macs else 0.0
            pct = f"{100 * gmacs / (2 * lanes * mhz / 1e3 * threads):.0f} %" if mhz else "-"
            prec = r["encoder_precision"] + ("" if r.get("decoder_precision") in (None, r["encoder_precision"])
                                             else f" (dec {r['decoder_precision']})")
            if r.get("decoder_form"):
                prec += f", decoder {r['decoder_form']}"
            row = f"| {name} | {prec} | {fmt_runs(r['encoder_ms'])} | {gmacs:.1f} | {pct} |"
            for b in args.batches:
                times = r["decoder_ms"].get(str(b))
                row += f" {median(times) / b:.1f} |" if times else " - |"
            frame = r.get("decoder_frame_ms")
            row += f" {median(frame):.1f} |" if frame else " - |"
            row += f" {r['peak_rss_mib']:.0f} | {r['load_ms']:.0f} |"
            lines.append(row)
        lines += ["", *ratios(rows, args.batches), ""]
    return "\n".join(lines) + "\n"


def ratios(rows: list[dict], batches: list[int]) -> list[str]:
    def pick(engine, precision, variant="", decoder=""):
        return next((r for r in rows if r["engine"] == engine and r["encoder_precision"] == precision
                     and r.get("variant", "") == variant and r.get("decoder", "") == decoder and "error" not in r), None)

    def enc(engine, precision, variant=""):
        r = pick(engine, precision, variant)
        return median(r["encoder_ms"]) if r else None

    def dec(engine, precision, b, variant="", decoder=""):
        r = pick(engine, precision, variant, decoder)
        t = r["decoder_ms"].get(str(b)) if r else None
        return median(t) / b if t else None

    out = []
    pairs = [
        ("encoder: tract INT8 / onnxruntime INT8 (target <= 1.0)", enc("tract", "int8"), enc("onnxruntime", "int8")),
        ("encoder: tract INT8 / the faster of onnxruntime INT8 and FP32 (issue 21: target <= 0.67)", enc("tract", "int8"),
         min([t for t in (enc("onnxruntime", "int8"), enc("onnxruntime", "fp32")) if t], default=None)),
        ("encoder: tract INT8 / tract FP32 (issue 21: target <= 0.5; on AVX-512/VNNI never above 1.0)",
         enc("tract", "int8"), enc("tract", "fp32")),
        ("encoder: tract INT8 on our AVX2 kernel / on the VNNI kernel (same CPU)", enc("tract", "int8", "avx2"),
         enc("tract", "int8")),
        ("encoder: tract INT8, our kernels / tract's kernels (issue 9: before -> after)", enc("tract", "int8"),
         enc("tract", "int8", "tract")),
        ("encoder: tract INT8 with tract's kernels / tract FP32 (before)", enc("tract", "int8", "tract"),
         enc("tract", "fp32")),
        ("encoder: tract FP32 / onnxruntime FP32", enc("tract", "fp32"), enc("onnxruntime", "fp32")),
        ("encoder: onnxruntime INT8 / onnxruntime FP32", enc("onnxruntime", "int8"), enc("onnxruntime", "fp32")),
        ("encoder: tract FP32 / PyTorch FP32", enc("tract", "fp32"), enc("pytorch", "fp32")),
    ]
    big = max(batches)
    pairs += [
        (f"decoder b={big}: tract {p.upper()} / onnxruntime {p.upper()} (per prompt)", dec("tract", p, big), dec("onnxruntime", p, big))
        for p in ("int8", "fp32")
    ]
    # Issue 18: tract's default (split) decoder against onnxruntime's one-graph decoder.
    for b in sorted({min(batches), big}):
        pairs += [
            (f"decoder b={b}: tract FP32 (split) / onnxruntime FP32 one-graph (target <= 0.5)",
             dec("tract", "fp32", b), dec("onnxruntime", "fp32", b)),
            (f"decoder b={b}: tract FP32 split / tract FP32 one-graph (before -> after)",
             dec("tract", "fp32", b), dec("tract", "fp32", b, decoder="one-graph")),
            (f"decoder b={b}: tract FP32 split, low-rank / full-rank upscaling (before -> after)",
             dec("tract", "fp32", b), dec("tract", "fp32", b, decoder="split-full-rank")),
            (f"decoder b={b}: onnxruntime FP32 split / one-graph (the split's gain on onnxruntime)",
             dec("onnxruntime", "fp32", b, "split"), dec("onnxruntime", "fp32", b)),
            (f"decoder b={b}: tract FP32 split / onnxruntime FP32 split (same graphs)",
             dec("tract", "fp32", b), dec("onnxruntime", "fp32", b, "split")),
        ]
    for label, a, b in pairs:
        if a and b:
            out.append(f"- {label}: **{a / b:.2f}**")
    for p in ("int8", "fp32"):
        d = dec("tract", p, big)
        if d:
            out.append(f"- tract {p.upper()} decoder batch {big}: {d:.1f} ms per prompt (target <= 1 ms)")
    return out


def locked_version(crate: str) -> str:
    """The version of `crate` in Cargo.lock (what the tinysam binary was built with)."""
    lock = (ROOT / "Cargo.lock").read_text()
    found = re.search(rf'name = "{re.escape(crate)}"\nversion = "([^"]+)"', lock)
    return found.group(1) if found else "?"


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    p.add_argument("--image", type=Path)
    p.add_argument("--threads", default=f"{os.cpu_count()},1", help="thread counts, comma separated")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--budget", type=float, default=90.0, help="seconds after which a measurement stops repeating")
    p.add_argument("--engines", default="tract:int8,tract:int8:tract,tract:fp32,tract:fp32::one-graph,onnxruntime:int8,"
                   "onnxruntime:fp32,onnxruntime:fp32:split,pytorch:fp32",
                   help="engine:precision[:variant[:decoder]]; tract's variant is its --int8-matmul and decoder its "
                   "--decoder-graph; onnxruntime's variant `split` runs the per-frame + per-prompt decoder pair")
    p.add_argument("--tinysam", type=Path, default=ROOT / "target" / "release" / "tinysam")
    p.add_argument("--out", type=Path, default=ROOT / "benches" / "compare-results.md")
    p.add_argument("--worker", choices=["onnxruntime", "pytorch"], help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    args.model = args.model.resolve()
    if args.worker:
        args.threads = int(args.threads)
        result = (worker_onnxruntime if args.worker == "onnxruntime" else worker_torch)(args)
        print(json.dumps(result))
        return 0
    args.threads = [int(t) for t in str(args.threads).split(",") if t]
    if not (args.model / "manifest.json").exists():
        print(f"no model at {args.model}: export it with "
              "`cd models && .venv/bin/python -m tinysam_export export --synthetic --seed 0 --config full --out build/full`",
              file=sys.stderr)
        return 1
    if not args.tinysam.exists():
        print(f"{args.tinysam} missing: cargo build --release --locked", file=sys.stderr)
        return 1
    if args.image is None:
        shared = ROOT.parent / "shared" / "images" / "tinysam-picture2.jpg"
        if shared.exists():
            args.image = shared
        else:
            print(f"{shared} not found (no ../shared here): using the synthetic 640x480 pattern", file=sys.stderr)
    manifest = json.loads((args.model / "manifest.json").read_text())
    started = time.monotonic()
    results = []
    for threads in args.threads:
        for spec in args.engines.split(","):
            engine, precision, *rest = spec.split(":")
            variant, decoder = (rest + ["", ""])[:2]
            results.append(run_engine(args, engine, precision, threads, variant, decoder))
    text = report(args, results, manifest, time.monotonic() - started)
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
