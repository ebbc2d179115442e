"""The Raspberry Pi 5 projection: cycles of our aarch64 kernels' inner loops on a Cortex-A76 (and
the portable int8 loop on a Cortex-A53), estimated by llvm-mca, and the encoder's modelled time.

    python3 benches/pi5_mca.py            # writes benches/pi5-mca-results.md

Needs rustc with the aarch64-unknown-linux-gnu target (`rustup target add`, as cross/env.sh does)
and Debian's `llvm` (llvm-mca). No timing runs here: qemu timings mean nothing, and llvm-mca's
scheduling model of the core is the one timing proxy this machine has.

What is measured:
- `sdot` int8 tile (`src/model/qmatmul/neon.rs`): its inline-assembly loop, as written.
- portable int8 tile (`src/model/qmatmul/portable.rs`, what a Cortex-A53 runs), the attention
  kernel (`src/model/ops/attention/kernel.rs`), the W8A16 tile of the INT8 encoder's stem and
  MBConv stage (`src/model/ops/w8a16.rs`) and the decoder's f32 product micro-kernel
  (`src/model/ops/gemm.rs`, NEON): the real source files, compiled alone by rustc
  for the core (`-C target-cpu=...`) through a small wrapper crate, then the innermost loops of
  the compiled functions found in the assembly and given to llvm-mca.
MACs per loop iteration are counted from the instructions (sdot on 16 bytes: 16; smlal/smlal2 and
fmla on 4 lanes: 4). The W8A16 tile (x86's form of the INT8 stem and MBConv products) is
measured to show why aarch64 keeps those products in f32: `smlal` does no more multiply-adds
an instruction than `fmla`, and the A76 issues `fmla` on both vector pipes, `smlal` on one. The encoder's modelled time divides the MACs each kernel class runs (from
`tinysam info` on this host: the graph, hence the split, is the same on aarch64) by the modelled
rate on the Pi 5's four 2.4 GHz cores (our fused stem and MBConv ops at the rate of the gemm.rs
micro-kernel they run on), and models tract's float products at the A76's f32 peak (2 x 128-bit
FMA: 8 MACs a cycle), a lower bound; the element-wise remainder is not modelled.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = "aarch64-unknown-linux-gnu"
PI5_GHZ = 2.4
PI5_CORES = 4

WRAPPER = """
#![allow(dead_code, unused, private_interfaces, clippy::all)]
pub mod model {{
    pub mod qmatmul {{
        pub const PAIR_MR: usize = {mr};
        pub const PAIR_NR: usize = {nr};
        pub type TileRequant<'a> = (&'a [i32], &'a [f32], i32);
        pub fn requant_tile(acc: &[i32], _nr: usize, _r: TileRequant<'_>, out: &mut [i8]) {{
            for (o, &v) in out.iter_mut().zip(acc) {{ *o = v as i8; }}
        }}
        #[path = "{root}/src/model/qmatmul/portable.rs"]
        mod portable;
        #[no_mangle]
        pub fn mca_i8_portable(a: &[i32], b: &[i16], out: &mut [i32; PAIR_MR * PAIR_NR]) {{
            portable::sums(a, b, out)
        }}
    }}
    pub mod ops {{
        #[path = "{root}/src/model/ops/fastmath.rs"]
        pub mod fastmath;
        #[path = "{root}/src/model/ops/transpose.rs"]
        pub mod transpose;
        pub mod attention {{
            #[path = "{root}/src/model/ops/attention/kernel.rs"]
            pub mod kernel;
            #[no_mangle]
            pub fn mca_attention(h: &kernel::Head<'_>, out: &mut [f32], s: &mut kernel::Scratch) {{
                kernel::head_portable(h, out, s)
            }}
        }}
        #[path = "{root}/src/model/ops/w8a16.rs"]
        pub mod w8a16;
        #[no_mangle]
        pub fn mca_w8a16(a: &w8a16::A16Rows, w: &w8a16::W8Weights, c: &mut [f32]) {{
            w8a16::product(w8a16::W8A16Kernel::Portable, a, w, c)
        }}
        #[path = "{root}/src/model/ops/gemm.rs"]
        pub mod gemm;
        use gemm::Micro;
        #[no_mangle]
        pub fn mca_gemm(a: &[f32], lda: usize, panel: &[f32], out: &mut [f32]) {{
            gemm::Neon.block(a, lda, panel, out)
        }}
    }}
}}
"""


def const(path: Path, name: str) -> int:
    m = re.search(rf"const {name}: usize = (\d+);", path.read_text())
    if not m:
        sys.exit(f"{name} not found in {path}")
    return int(m.group(1))


def compile_asm(cpu: str, work: Path) -> str:
    src = work / "kernels.rs"
    src.write_text(WRAPPER.format(
        root=ROOT, mr=const(ROOT / "src/model/qmatmul/mod.rs", "PAIR_MR"),
        nr=const(ROOT / "src/model/qmatmul/mod.rs", "PAIR_NR")))
    out = work / f"kernels-{cpu}.s"
    subprocess.run(["rustc", "--edition", "2021", "--crate-type", "lib", "--target", TARGET,
                    "-C", "opt-level=3", "-C", f"target-cpu={cpu}", "--emit", f"asm={out}", str(src)],
                   check=True)
    return out.read_text()


def function_body(asm: str, symbol: str) -> list[str]:
    lines = asm.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"{symbol}:"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(".size") or
               lines[i].strip() == ".cfi_endproc")
    return lines[start:end]


def followed(asm: str, symbol: str) -> list[str]:
    """The body of `symbol`, or of the function it tail-calls (a wrapper that is one `b`)."""
    body = function_body(asm, symbol)
    calls = [m.group(1) for l in body if (m := re.match(r"\s+b\s+(_\w+)$", l))]
    return function_body(asm, calls[0]) if len(calls) == 1 and len(body) < 16 else body


def loops(body: list[str]) -> list[list[str]]:
    """Every block from a label to a branch back to it, innermost ones (no label inside) only."""
    labels = {l.split(":")[0]: i for i, l in enumerate(body) if re.match(r"^\.?\w+:", l)}
    found = []
    for i, line in enumerate(body):
        m = re.match(r"\s+(?:b\.\w+|cbnz|cbz|tbnz|tbz|b)\s+(?:\w+,\s*)*(?:#\d+,\s*)?(\.?\w+)$", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            raw = body[labels[m.group(1)] + 1:i + 1]
            if not any(re.match(r"^\.?\w+:", l) for l in raw):
                found.append([l for l in raw if l.strip() and not l.strip().startswith((".", "//"))])
    return found


def macs(block: list[str]) -> int:
    n = 0
    for l in block:
        ins = l.strip()
        if ins.startswith("sdot") and ".16b" in ins:
            n += 16
        elif re.match(r"(smlal2?|fmla)\s", ins) and ".4s" in ins:
            n += 4
        elif re.match(r"(smlal2?|fmla)\s", ins) and ".2s" in ins:
            n += 2
        elif re.match(r"(madd|mul)\s+w", ins):  # scalar i32 multiply(-add): one MAC
            n += 1
    return n


def mca(block: list[str], cpu: str) -> float:
    """Cycles per iteration (llvm-mca's steady state over 1000 iterations)."""
    text = "\n".join(l for l in block if not re.match(r"\s+(b\.\w+|cbnz|cbz|b)\s", l)) + "\n"
    res = subprocess.run(["llvm-mca", "-mtriple=aarch64", f"-mcpu={cpu}", "-iterations=1000"],
                         input=text, capture_output=True, text=True, check=True).stdout
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", res).group(1))
    return cycles / 1000


def sdot_loop() -> list[str]:
    src = (ROOT / "src/model/qmatmul/neon.rs").read_text()
    body = src[src.index('"2:",'):src.index('"b.ne 2b",')]
    ins = re.findall(r'"([^"]+)"', body)[1:]
    return ["\t" + i.replace("{{", "{").replace("}}", "}").replace("{b}", "x1").replace("{a}", "x0")
            .replace("{q}", "x2") for i in ins]


def tinysam_macs() -> dict[str, float]:
    """GMAC per kernel class of the default INT8 encoder, from `tinysam info` on this host."""
    exe = ROOT / "target" / "release" / "tinysam"
    out = subprocess.run([str(exe), "info", "--model", str(ROOT / "models" / "default")],
                         capture_output=True, text=True, check=True).stdout
    enc = out[re.search(r"^encoder ", out, re.M).start():re.search(r"^decoder ", out, re.M).start()]
    classes = {"int8": 0.0, "attention": 0.0, "gemm": 0.0, "float": 0.0}
    for gmac, name in re.findall(r"([\d.]+) GMAC\s+(\S+)", enc):
        if name.startswith("tinysam_i8"):
            key = "int8"
        elif "attention" in name:
            key = "attention"
        elif name.startswith(("tinysam_mbconv", "tinysam_stem")):
            # Our fused stage-0 ops: on aarch64 their products run on the gemm.rs micro-kernel
            # (this x86 host runs them as W8A16, `_w8a16_` in the name; aarch64 keeps f32).
            key = "gemm"
        else:
            key = "float"
        classes[key] += float(gmac)
    return classes


def main() -> int:
    for tool in ("rustc", "llvm-mca"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (llvm-mca: apt-get install llvm)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        a76 = compile_asm("cortex-a76", work)
        a53 = compile_asm("cortex-a53", work)
        sdot = sdot_loop()
        rows.append(("int8 `sdot` tile 8x8 (neon.rs, inline asm)", "cortex-a76", sdot, "int8", 32))
        for cpu, asm in (("cortex-a53", a53), ("cortex-a76", a76)):
            body = function_body(asm, "mca_i8_portable")
            best = max(loops(body), key=macs)
            rows.append((f"int8 portable i16-pair tile 6x16 (portable.rs, rustc {cpu})", cpu, best,
                         "int8-portable", 8 if cpu == "cortex-a76" else 4))
        for cpu, asm in (("cortex-a53", a53), ("cortex-a76", a76)):
            body = followed(asm, "mca_w8a16")
            rows.append((f"W8A16 portable tile 4x8 (w8a16.rs, rustc {cpu}; x86's INT8 stem and MBConv "
                         "form, not chosen on aarch64)", cpu, max(loops(body), key=macs), "w8a16", 4))
        body = function_body(a76, "mca_gemm")
        rows.append(("f32 product micro-kernel 3x32 (gemm.rs, NEON intrinsics; decoder, stem, MBConv)", "cortex-a76",
                     max(loops(body), key=macs), "gemm", 8))
        body = function_body(a76, "mca_attention")
        for block in loops(body):
            if any(re.match(r"\s+shl\s+v\d+\.4s, v\d+\.4s, #23", l) for l in block):  # 2^n of exp
                rows.append(("attention exp (fastmath.rs, rustc cortex-a76)", "cortex-a76", block, "exp", 8))
            elif macs(block) >= 64:
                # The weighted sums (two rows at a time, NEON intrinsics) load eight vectors of v per
                # step; the scores loop two of kᵀ.
                vector_loads = sum(2 if re.match(r"\s+ldp\s+q", l) else 0 for l in block)
                what = ("weighted sums, 2 rows (kernel.rs, NEON intrinsics)" if vector_loads >= 8
                        else "scores, 4 rows (kernel.rs, rustc cortex-a76)")
                rows.append((f"attention f32 {what}", "cortex-a76", block, "attention", 8))
    table = ["| kernel loop | core | instructions | MACs / iteration | cycles / iteration (llvm-mca) | "
             "MACs / cycle | core peak |", "|---|---|---|---|---|---|---|"]
    rates: dict[str, list[float]] = {}
    exp_cycles, exp_lanes = 0.0, 0
    for name, cpu, block, cls, peak in rows:
        cyc = mca(block, cpu)
        m = macs(block)
        rate = m / cyc if cyc else 0.0
        if cls == "exp":
            lanes = 4 * max(1, sum(1 for l in block if re.match(r"\s+shl\s+v\d+\.4s, v\d+\.4s, #23", l)))
            # The widest exp loop is the main one (narrower ones take a row's last few values).
            if lanes > exp_lanes:
                exp_lanes, exp_cycles = lanes, cyc / lanes
            table.append(f"| {name} | {cpu} | {len(block)} | {lanes} exps | {cyc:.2f} | {cyc / lanes:.1f} cycles per exp | - |")
            continue
        if cpu == "cortex-a76" and cls not in ("int8-portable", "w8a16"):
            rates.setdefault(cls, []).append(rate)
        table.append(f"| {name} | {cpu} | {len(block)} | {m} | {cyc:.2f} | {rate:.1f} | {peak} |")
    classes = tinysam_macs()
    hz = PI5_GHZ * 1e9 * PI5_CORES
    r_int8 = max(rates["int8"])
    r_att = min(rates.get("attention", [8.0]))  # the slower of the q.k and attn.v loops
    head_dim = 32  # TinySAM's attention heads (embed dims / heads: 128/4, 160/5, 320/10)
    exps = classes["attention"] * 1e9 / (2 * head_dim)
    t_int8 = classes["int8"] * 1e9 / (r_int8 * hz)
    t_att = classes["attention"] * 1e9 / (r_att * hz) + exps * exp_cycles / hz
    t_float = classes["float"] * 1e9 / (8.0 * hz)
    r_gemm = max(rates.get("gemm", [8.0]))
    t_gemm = classes["gemm"] * 1e9 / (r_gemm * hz)
    model = [
        "| part of the INT8 encoder | GMAC | modelled rate (MACs/cycle/core) | ms on 4 x 2.4 GHz |",
        "|---|---|---|---|",
        f"| int8 products on `sdot` | {classes['int8']:.2f} | {r_int8:.1f} | {t_int8 * 1e3:.0f} |",
        f"| attention cores (f32, ours), products + {exps / 1e6:.0f} M exps at {exp_cycles:.1f} cycles | "
        f"{classes['attention']:.2f} | {r_att:.1f} | {t_att * 1e3:.0f} |",
        f"| stem and MBConv stage (f32, ours: `TinysamStem`, `TinysamMbConv`) on the gemm.rs micro-kernel | "
        f"{classes['gemm']:.2f} | {r_gemm:.1f} | {t_gemm * 1e3:.0f} |",
        f"| tract's float products and depthwise convs (at the f32 peak) | {classes['float']:.2f} | 8.0 | "
        f"{t_float * 1e3:.0f} |",
        f"| **products, modelled** | {sum(classes.values()):.2f} | | "
        f"**{(t_int8 + t_att + t_gemm + t_float) * 1e3:.0f}** |",
    ]
    text = "\n".join([
        "# Raspberry Pi 5 projection (llvm-mca)",
        "",
        f"Made by `python3 benches/pi5_mca.py` on {datetime.now(timezone.utc):%Y-%m-%d} "
        f"({next(l.strip() for l in subprocess.run(['llvm-mca', '--version'], capture_output=True, text=True).stdout.splitlines() if 'version' in l)}, "
        f"{subprocess.run(['rustc', '--version'], capture_output=True, text=True).stdout.strip()}). "
        "Method and caveats: the script's docstring.",
        "",
        "## Inner loops",
        "",
        "LLVM 14 has no scheduling model of its own for the Cortex-A76: `-mcpu=cortex-a76` uses an older "
        "big-core model (128-bit FP ops as two micro-ops, one a cycle), so float rates are pessimistic against "
        "the A76's two 128-bit FMA pipes; the `sdot` figure matches the A76's documented 2 x 16 MACs a cycle.",
        "",
        *table,
        "",
        "## The encoder's modelled time",
        "",
        "MACs per kernel class from `tinysam info --model models/default` (INT8 encoder). The element-wise "
        "remainder (LayerNorm, GELU, window partition copies, residual adds, quantize/dequantize) is not "
        "modelled: on x86 it is ~25 % of the encoder (`tinysam bench --profile`).",
        "",
        *model,
        "",
    ])
    out = ROOT / "benches" / "pi5-mca-results.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
