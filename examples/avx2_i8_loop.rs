//! The inner loop of tract-linalg 0.23.9's `avx2_mmm_i32_8x8` int8 kernel (one k step of an 8x8
//! i8 x i8 -> i32 tile: widen to i16, multiply, widen to i32, accumulate), timed twice: with the
//! A-row load as tract writes it, a legacy-SSE `movq`, and as VEX `vmovq`. On CPUs that pay for
//! SSE/AVX state transitions, the one legacy instruction makes the whole loop an order of
//! magnitude slower. See docs/performance.md.
//!
//! ```text
//! cargo run --release --example avx2_i8_loop
//! ```

#[cfg(target_arch = "x86_64")]
mod probe {
    use std::arch::asm;
    use std::time::Instant;

    /// Four columns of one k step: column j multiplies the A row (ymm8, as i16) by B byte j and
    /// adds into accumulator ymm j, as tract's loop does.
    macro_rules! four_columns {
        ($c0:literal, $c1:literal, $c2:literal, $c3:literal) => {
            concat!(
                "vpbroadcastb ymm9, byte ptr [{b} + ",
                $c0,
                "]\n",
                "vpbroadcastb ymm10, byte ptr [{b} + ",
                $c1,
                "]\n",
                "vpbroadcastb ymm11, byte ptr [{b} + ",
                $c2,
                "]\n",
                "vpbroadcastb ymm12, byte ptr [{b} + ",
                $c3,
                "]\n",
                "vpmovsxbw ymm9, xmm9\n",
                "vpmovsxbw ymm10, xmm10\n",
                "vpmovsxbw ymm11, xmm11\n",
                "vpmovsxbw ymm12, xmm12\n",
                "vpmullw ymm9, ymm9, ymm8\n",
                "vpmullw ymm10, ymm10, ymm8\n",
                "vpmullw ymm11, ymm11, ymm8\n",
                "vpmullw ymm12, ymm12, ymm8\n",
                "vpmovsxwd ymm9, xmm9\n",
                "vpmovsxwd ymm10, xmm10\n",
                "vpmovsxwd ymm11, xmm11\n",
                "vpmovsxwd ymm12, xmm12\n",
                "vpaddd ymm",
                $c0,
                ", ymm",
                $c0,
                ", ymm9\n",
                "vpaddd ymm",
                $c1,
                ", ymm",
                $c1,
                ", ymm10\n",
                "vpaddd ymm",
                $c2,
                ", ymm",
                $c2,
                ", ymm11\n",
                "vpaddd ymm",
                $c3,
                ", ymm",
                $c3,
                ", ymm12\n",
            )
        };
    }

    /// `k` steps over 8-byte A and B panels, loading each A row with the instruction `$load`.
    macro_rules! k_loop {
        ($load:literal, $a:expr, $b:expr, $k:expr) => {
            asm!(
                "2:",
                concat!($load, " xmm8, qword ptr [{a}]"),
                "vpmovsxbw ymm8, xmm8",
                four_columns!("0", "1", "2", "3"),
                four_columns!("4", "5", "6", "7"),
                "add {a}, 8", "add {b}, 8", "dec {k}", "jnz 2b", "vzeroupper",
                a = inout(reg) $a => _, b = inout(reg) $b => _, k = inout(reg) $k => _,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _,
                out("ymm5") _, out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _,
                out("ymm10") _, out("ymm11") _, out("ymm12") _,
            )
        };
    }

    /// Run `k` steps of the loop over 8-byte A and B panels; `vex` picks the A-load encoding.
    fn run(a: &[i8], b: &[i8], k: usize, vex: bool) {
        assert!(a.len() >= 8 * k && b.len() >= 8 * k && k > 0);
        // SAFETY: the loop reads 8 * k bytes from each panel (checked above), writes only the
        // registers declared as clobbered, and leaves the upper YMM state clean (vzeroupper).
        unsafe {
            if vex {
                k_loop!("vmovq", a.as_ptr(), b.as_ptr(), k);
            } else {
                k_loop!("movq", a.as_ptr(), b.as_ptr(), k);
            }
        }
    }

    /// Time both encodings at the k of the encoder's neck conv (2304) and print GMAC/s.
    pub fn main() {
        if !is_x86_feature_detected!("avx2") {
            println!("no AVX2 on this CPU: nothing to measure");
            return;
        }
        let k = 2304;
        let (a, b) = (vec![1i8; 8 * k], vec![2i8; 8 * k]);
        let tiles = 20_000;
        for vex in [false, true, false, true] {
            let t = Instant::now();
            for _ in 0..tiles {
                run(&a, &b, k, vex);
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{:<18} {:>6.2} GMAC/s  {:>6.1} ns per k step (64 MACs)",
                if vex {
                    "vmovq (VEX)"
                } else {
                    "movq (legacy SSE)"
                },
                (tiles * k * 64) as f64 / s / 1e9,
                s / (tiles * k) as f64 * 1e9
            );
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    probe::main();
    #[cfg(not(target_arch = "x86_64"))]
    println!("an x86_64 probe: nothing to measure on this architecture");
}
