//! Every kernel against the straightforward definition: exact integers, all shapes.

use proptest::prelude::*;

use super::*;

/// Deterministic i8 values covering the extremes.
fn values(len: usize, seed: u32) -> Vec<i8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8 as i8
        })
        .collect()
}

/// Run `kernel` and the reference on the same operands; panics on any difference.
fn check(kernel: Kernel, m: usize, k: usize, n: usize, layouts: (Layout, Layout), seed: u32) {
    let (a_layout, c_layout) = layouts;
    let a = values(m * k, seed);
    let b = values(k * n, seed + 1);
    let requant = Requant {
        bias: (0..n).map(|j| j as i32 * 37 - 200).collect(),
        scale: (0..n).map(|j| 0.001 + j as f32 * 0.0003).collect(),
        zero_point: 0,
    };
    let a_mat = MatrixA {
        data: Activations::I8(&a),
        m,
        layout: a_layout,
    };
    let want = reference_qmatmul(a_mat, &b, k, n, &requant, c_layout);
    let packed = PackedB::from_row_major(kernel, k, n, &b);
    let mut got = vec![0i8; m * n];
    qmatmul(&a_mat, &packed, &requant, Output::I8(&mut got), c_layout).unwrap();
    assert_eq!(
        got, want,
        "{kernel} m={m} k={k} n={n} {a_layout:?} {c_layout:?}"
    );
}

const LAYOUTS: [(Layout, Layout); 4] = [
    (Layout::RowMajor, Layout::RowMajor),
    (Layout::ColMajor, Layout::RowMajor),
    (Layout::RowMajor, Layout::ColMajor),
    (Layout::ColMajor, Layout::ColMajor),
];

#[test]
fn every_kernel_matches_the_reference_on_edge_shapes() {
    let shapes = [
        (1, 1, 1),
        (1, 3, 1),
        (6, 2, 16),
        (7, 5, 17),
        (8, 4, 8),
        (13, 64, 33),
        (50, 160, 40),
        (3, 1280, 5),
    ];
    for kernel in Kernel::supported() {
        for &(m, k, n) in &shapes {
            for layouts in LAYOUTS {
                check(kernel, m, k, n, layouts, (m * k * n) as u32);
            }
        }
    }
}

/// The largest sums the encoder can produce: all -128 × -128 over a long depth stay exact.
#[test]
fn extreme_values_accumulate_exactly() {
    let (m, k, n) = (9, 1280, 20);
    let a = vec![-128i8; m * k];
    let b = vec![-128i8; k * n];
    let requant = Requant {
        bias: vec![0],
        scale: vec![1.0 / (128.0 * 128.0 * 1280.0) * 100.0],
        zero_point: 0,
    };
    for kernel in Kernel::supported() {
        let packed = PackedB::from_row_major(kernel, k, n, &b);
        let mut c = vec![0i8; m * n];
        let a_mat = MatrixA {
            data: Activations::I8(&a),
            m,
            layout: Layout::RowMajor,
        };
        qmatmul(
            &a_mat,
            &packed,
            &requant,
            Output::I8(&mut c),
            Layout::RowMajor,
        )
        .unwrap();
        assert!(c.iter().all(|&v| v == 100), "{kernel}: {:?}", &c[..4]);
    }
}

#[test]
fn requantization_rounds_ties_to_even_and_saturates() {
    let r = Requant {
        bias: vec![0],
        scale: vec![0.5],
        zero_point: 0,
    };
    assert_eq!(r.apply(5, 0), 2);
    assert_eq!(r.apply(7, 0), 4);
    assert_eq!(r.apply(-5, 0), -2);
    assert_eq!(r.apply(1000, 0), 127);
    assert_eq!(r.apply(-1000, 0), -128);
    let shifted = Requant {
        bias: vec![10, -10],
        scale: vec![1.0, 2.0],
        zero_point: 3,
    };
    assert_eq!(shifted.apply(0, 0), 13);
    assert_eq!(shifted.apply(0, 1), -17);
    assert_eq!(shifted.apply(i32::MAX, 1), 127);
}

#[test]
fn threaded_runs_give_the_same_result() {
    let (m, k, n) = (301, 96, 70);
    let a = values(m * k, 7);
    let b = values(k * n, 8);
    let requant = Requant {
        bias: vec![5],
        scale: vec![0.002],
        zero_point: 0,
    };
    let a_mat = MatrixA {
        data: Activations::I8(&a),
        m,
        layout: Layout::RowMajor,
    };
    let want = reference_qmatmul(a_mat, &b, k, n, &requant, Layout::ColMajor);
    let packed = PackedB::from_row_major(Kernel::detect(), k, n, &b);
    let mut got = vec![0i8; m * n];
    tract_linalg::multithread::multithread_tract_scope(
        tract_linalg::multithread::Executor::multithread(3),
        || {
            qmatmul(
                &a_mat,
                &packed,
                &requant,
                Output::I8(&mut got),
                Layout::ColMajor,
            )
        },
    )
    .unwrap();
    assert_eq!(got, want);
}

#[test]
fn mismatched_operands_are_errors_not_panics() {
    let packed = PackedB::from_row_major(Kernel::Portable, 4, 3, &[1; 12]);
    let requant = Requant {
        bias: vec![0],
        scale: vec![1.0],
        zero_point: 0,
    };
    let a = [1i8; 7];
    let a_mat = MatrixA {
        data: Activations::I8(&a),
        m: 2,
        layout: Layout::RowMajor,
    };
    let mut c = vec![0i8; 6];
    assert!(qmatmul(
        &a_mat,
        &packed,
        &requant,
        Output::I8(&mut c),
        Layout::RowMajor
    )
    .is_err());
    let bad_scale = Requant {
        scale: vec![1.0, 2.0],
        ..requant
    };
    let a = [1i8; 8];
    let a_mat = MatrixA {
        data: Activations::I8(&a),
        ..a_mat
    };
    assert!(qmatmul(
        &a_mat,
        &packed,
        &bad_scale,
        Output::I8(&mut c),
        Layout::RowMajor
    )
    .is_err());
}

#[test]
fn kernel_names_parse_and_detection_picks_a_supported_one() {
    for k in [
        Kernel::Portable,
        Kernel::Avx2,
        Kernel::Avx512Vnni,
        Kernel::NeonDot,
    ] {
        assert_eq!(k.to_string().parse::<Kernel>(), Ok(k));
    }
    assert!("sse9".parse::<Kernel>().is_err());
    assert!(Kernel::detect().is_supported());
    #[cfg(target_arch = "x86_64")]
    if Kernel::Avx512Vnni.is_supported() {
        assert_eq!(Kernel::detect(), Kernel::Avx512Vnni);
    } else if std::arch::is_x86_feature_detected!("avx2") {
        assert_eq!(Kernel::detect(), Kernel::Avx2);
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("dotprod") {
        assert_eq!(Kernel::detect(), Kernel::NeonDot);
    } else {
        // A Cortex-A53 (Pi 3/4's core is the A72, also without the dot product).
        assert_eq!(Kernel::detect(), Kernel::Portable);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any shape, any layout, any kernel this CPU runs: the reference's exact integers.
    #[test]
    fn any_shape_matches_the_reference(
        m in 1usize..40,
        k in 1usize..90,
        n in 1usize..40,
        layout in 0usize..4,
        seed in any::<u32>(),
    ) {
        for kernel in Kernel::supported() {
            check(kernel, m, k, n, LAYOUTS[layout], seed);
        }
    }
}

/// The vector quantizer gives the scalar rule's values: ties, saturation, NaN, odd lengths.
#[test]
fn quantize_slice_matches_the_scalar_rule() {
    let q = Quantize {
        scale: 2.0,
        zero_point: 0,
    };
    let mut xs: Vec<f32> = vec![
        0.25,
        0.75,
        -0.25,
        -0.75,
        1.25,
        63.25,
        63.75,
        -64.25,
        -64.0,
        1e12,
        -1e12,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        3.0e-8,
    ];
    xs.extend((0..37).map(|i| (i as f32 - 18.0) * 0.37));
    let mut fast = vec![0i8; xs.len()];
    q.slice(&xs, &mut fast);
    let slow: Vec<i8> = xs.iter().map(|&x| q.apply(x)).collect();
    assert_eq!(fast, slow);
    assert_eq!(&slow[..4], &[0, 2, 0, -2]); // 0.5 → 0, 1.5 → 2: ties to even
    assert_eq!(&slow[9..12], &[127, -128, 0]);
}

/// f32 in (quantized while packing) and f32 out (dequantized while storing) give exactly the
/// reference on the quantized values, dequantized.
#[test]
fn fused_quantize_and_dequantize_match_the_unfused_path() {
    let (m, k, n) = (23, 41, 19);
    let q = Quantize {
        scale: 9.5,
        zero_point: 0,
    };
    let dq = Dequantize {
        scale: 0.031,
        zero_point: 0,
    };
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 211) as f32 / 17.0 - 6.0)
        .collect();
    let b = values(k * n, 3);
    let requant = Requant {
        bias: vec![3],
        scale: vec![0.004],
        zero_point: 0,
    };
    // The symmetric dequantization the export writes, and one with a zero point (the VNNI
    // kernel dequantizes in registers: both must equal `Dequantize::apply`).
    let offset = Dequantize {
        scale: 0.017,
        zero_point: -5,
    };
    for (kernel, dq) in Kernel::supported()
        .into_iter()
        .flat_map(|k| [(k, dq), (k, offset)])
    {
        let packed = PackedB::from_row_major(kernel, k, n, &b);
        for (a_layout, c_layout) in LAYOUTS {
            let a_f32 = MatrixA {
                data: Activations::F32(&x, q),
                m,
                layout: a_layout,
            };
            let want: Vec<f32> = reference_qmatmul(a_f32, &b, k, n, &requant, c_layout)
                .into_iter()
                .map(|v| dq.apply(v))
                .collect();
            let mut got = vec![0f32; m * n];
            qmatmul(
                &a_f32,
                &packed,
                &requant,
                Output::F32(&mut got, dq),
                c_layout,
            )
            .unwrap();
            assert_eq!(got, want, "{kernel} {a_layout:?} {c_layout:?}");
        }
    }
}

/// A requantized output (dequantize, bias + GELU, quantize again, per task) equals the f32
/// output with the same finish, quantized afterwards: on every kernel, on one and on three
/// threads, with row counts that fill no tile or task evenly, and with k = 0.
#[test]
fn requantized_rows_equal_quantizing_the_f32_output() {
    let q = Quantize {
        scale: 7.5,
        zero_point: 0,
    };
    let dq = Dequantize {
        scale: 0.021,
        zero_point: 0,
    };
    for (m, k, n) in [(301, 40, 35), (9, 16, 16), (1, 5, 3), (70, 0, 12)] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 211) as f32 / 17.0 - 6.0)
            .collect();
        let b = values(k * n, 5);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.03 - 0.4).collect();
        let requant = Requant {
            bias: vec![-7],
            scale: vec![0.006],
            zero_point: 0,
        };
        let finish = |rows: &mut [f32]| super::epilogue::apply_rows(rows, n, Some(&bias), true);
        for kernel in Kernel::supported() {
            let packed = PackedB::from_row_major(kernel, k, n, &b);
            let a = MatrixA {
                data: Activations::F32(&x, q),
                m,
                layout: Layout::RowMajor,
            };
            let mut f32_out = vec![0f32; m * n];
            let out = Output::F32(&mut f32_out, dq);
            qmatmul_then(&a, &packed, &requant, out, Layout::RowMajor, Some(&finish)).unwrap();
            let mut want = vec![0i8; m * n];
            q.slice(&f32_out, &mut want);
            for threads in [1, 3] {
                let mut got = vec![0i8; m * n];
                tract_linalg::multithread::multithread_tract_scope(
                    tract_linalg::multithread::Executor::multithread(threads),
                    || {
                        let out = Output::Requantized(&mut got, dq, q);
                        qmatmul_then(&a, &packed, &requant, out, Layout::RowMajor, Some(&finish))
                    },
                )
                .unwrap();
                assert_eq!(got, want, "{kernel} {m}x{k}x{n}, {threads} threads");
            }
            let mut col = vec![0i8; m * n];
            let out = Output::Requantized(&mut col, dq, q);
            assert!(qmatmul_then(&a, &packed, &requant, out, Layout::ColMajor, None).is_err());
        }
    }
}

/// The fixture's INT8 encoder with its products chained (fc1 hands i8 rows to fc2) gives the
/// same embedding, bit for bit, as without.
#[test]
fn chained_products_keep_the_fixture_embedding() {
    use crate::model::test_support::{
        decluttered_encoder, fixture_dir, pattern_input, run_first_output,
    };
    let (mut graph, s) = decluttered_encoder(&fixture_dir(), crate::model::Precision::Int8);
    let mut report = rewrite_quantized_matmuls(&mut graph, Kernel::detect()).unwrap();
    fuse_quantization(&mut graph, &mut report).unwrap();
    fuse_epilogues(&mut graph).unwrap();
    let mut chained = graph.clone();
    let count = chain_products(&mut chained).unwrap();
    let mlp = graph
        .nodes()
        .iter()
        .filter(|n| n.name.contains("mlp/fc1") && n.op_is::<QMatMulOp>())
        .count();
    assert!(mlp > 0 && count >= mlp, "{count} chained, {mlp} MLPs");
    let input = pattern_input(s);
    assert_eq!(
        run_first_output(chained, &input).unwrap(),
        run_first_output(graph, &input).unwrap()
    );
}

/// The fixture's INT8 encoder with its 20 LayerNorms folded into the products after them (rows
/// normalised while packed): the same embedding, bit for bit; the shipped model's too on x86_64.
#[test]
fn folded_layer_norms_keep_the_embeddings() {
    use crate::model::test_support::{
        decluttered_encoder, fixture_dir, golden_input, pattern_input, run_first_output,
    };
    let default_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    let mut dirs = vec![(fixture_dir(), false)];
    if cfg!(target_arch = "x86_64") {
        dirs.push((default_dir, true));
    }
    for (dir, golden) in dirs {
        let (mut graph, s) = decluttered_encoder(&dir, crate::model::Precision::Int8);
        let mut report = rewrite_quantized_matmuls(&mut graph, Kernel::detect()).unwrap();
        fuse_quantization(&mut graph, &mut report).unwrap();
        fuse_epilogues(&mut graph).unwrap();
        crate::model::ops::rewrite_layer_norm(&mut graph).unwrap();
        let mut folded = graph.clone();
        assert_eq!(
            fold_layer_norms(&mut folded).unwrap(),
            20,
            "{}",
            dir.display()
        );
        let input = if golden {
            golden_input(&dir)
        } else {
            pattern_input(s)
        };
        assert_eq!(
            run_first_output(folded, &input).unwrap(),
            run_first_output(graph, &input).unwrap(),
            "{}",
            dir.display()
        );
    }
}

/// Patches gathered from an image equal an explicit im2col matrix, padding, strides and
/// dilations included, in the (ky, kx, channel) order that [`patch_order`] maps to OIHW's.
#[test]
fn im2col_rows_match_an_explicit_gather() {
    let geometry = conv::ConvGeometry {
        input: [3, 7, 6],
        kernel: [3, 2],
        strides: [2, 1],
        dilations: [1, 2],
        pad_before: [1, 1],
        output: [4, 5],
    };
    let image = values(3 * 7 * 6, 11);
    let floats: Vec<f32> = image.iter().map(|&v| f32::from(v) * 0.5).collect();
    let quantize = Quantize {
        scale: 2.0,
        zero_point: 0,
    };
    for source in [Activations::I8(&image), Activations::F32(&floats, quantize)] {
        let padded = PaddedImage::new(source, geometry);
        let patches = Im2Col { image: &padded };
        let mut row = vec![0i8; geometry.depth()];
        for p in 0..geometry.pixels() {
            patches.fetch(p, &mut row);
            let (oy, ox) = (p / 5, p % 5);
            let mut i = 0;
            for ky in 0..3 {
                for kx in 0..2 {
                    for c in 0..3 {
                        let y = (oy * 2 + ky) as isize - 1;
                        let x = (ox + kx * 2) as isize - 1;
                        let want = if (0..7).contains(&y) && (0..6).contains(&x) {
                            image[c * 42 + y as usize * 6 + x as usize]
                        } else {
                            0
                        };
                        assert_eq!(row[i], want, "pixel {p} value {i}");
                        // The same value's place in an OIHW kernel's patch row.
                        assert_eq!(patch_order(&geometry, i), c * 6 + ky * 2 + kx);
                        i += 1;
                    }
                }
            }
        }
    }
}

/// Not a test: `cargo test --release --lib qmatmul_speed -- --ignored --nocapture` times the
/// layers.1 MLP product (m = 16384, k = 128, n = 512) on this CPU's fastest kernel at 2 threads,
/// i8 to i8, f32 to f32 (fused quantize and dequantize), and f32 with bias and GELU in a pass
/// of their own and on each task's rows: best of 5.
#[test]
#[ignore]
fn qmatmul_speed() {
    crate::model::set_threads(2);
    let (m, k, n) = (16384, 128, 512);
    let kernel = Kernel::detect();
    let a = values(m * k, 1);
    let af: Vec<f32> = a.iter().map(|&v| v as f32 * 0.02).collect();
    let packed = PackedB::from_row_major(kernel, k, n, &values(k * n, 2));
    let (requant, q, dq) = speed_requantization(n, 0.0007);
    let epilogue = super::Epilogue {
        bias: Some(std::sync::Arc::new(
            (0..n).map(|j| j as f32 * 0.01).collect(),
        )),
        gelu: true,
    };
    let executor = tract_linalg::multithread::Executor::multithread(2);
    tract_linalg::multithread::multithread_tract_scope(executor, || {
        let rows = |data| MatrixA {
            data,
            m,
            layout: Layout::RowMajor,
        };
        let (a_i8, a_f32) = (rows(Activations::I8(&a)), rows(Activations::F32(&af, q)));
        let mut c8 = vec![0i8; m * n];
        let i8_ms = best_of_5(&mut || {
            qmatmul(
                &a_i8,
                &packed,
                &requant,
                Output::I8(&mut c8),
                Layout::RowMajor,
            )
            .unwrap();
        });
        let mut cf = vec![0f32; m * n];
        let f32_out = |finish: Option<RowsFinish<'_>>, cf: &mut [f32]| {
            let out = Output::F32(cf, dq);
            qmatmul_then(&a_f32, &packed, &requant, out, Layout::RowMajor, finish).unwrap();
        };
        let f32_ms = best_of_5(&mut || f32_out(None, &mut cf));
        let gelu_ms = best_of_5(&mut || {
            f32_out(None, &mut cf);
            epilogue.apply(&mut cf, n).unwrap();
        });
        let bias = epilogue.bias.as_deref().map(Vec::as_slice);
        let finish = |rows: &mut [f32]| super::epilogue::apply_rows(rows, n, bias, true);
        let fused_ms = best_of_5(&mut || f32_out(Some(&finish), &mut cf));
        let gmac = (m * k * n) as f64 / 1e9;
        eprintln!(
            "{} m={m} k={k} n={n}, 2 threads: i8->i8 {i8_ms:.1} ms ({:.0} GMAC/s), f32->f32 \
             {f32_ms:.1} ms, + bias + GELU {gelu_ms:.1} ms as a pass, {fused_ms:.1} ms per task",
            kernel.report_name(),
            gmac / i8_ms * 1e3
        );
    });
}

/// Not a test: `cargo test --release --lib qconv_speed -- --ignored --nocapture` times the
/// neck's 3×3 convolution (256 → 256 channels on 64 × 64, f32 in and out) on this CPU's fastest
/// kernel at 1 and 2 threads: the padded HWC copy and the product apart, best of 5.
#[test]
#[ignore]
fn qconv_speed() {
    use super::conv::ConvGeometry;
    let geometry = ConvGeometry {
        input: [256, 64, 64],
        kernel: [3, 3],
        strides: [1, 1],
        dilations: [1, 1],
        pad_before: [1, 1],
        output: [64, 64],
    };
    let (k, n) = (geometry.depth(), 256);
    let kernel = Kernel::detect();
    let packed = PackedB::from_row_major(kernel, k, n, &values(k * n, 2));
    let (requant, q, dq) = speed_requantization(n, 0.0001);
    let x: Vec<f32> = values(256 * 64 * 64, 1)
        .iter()
        .map(|&v| v as f32 * 0.02)
        .collect();
    for threads in [1, 2] {
        let executor = tract_linalg::multithread::Executor::multithread(threads);
        tract_linalg::multithread::multithread_tract_scope(executor, || {
            let pad_ms = best_of_5(&mut || {
                std::hint::black_box(PaddedImage::new(Activations::F32(&x, q), geometry));
            });
            let padded = PaddedImage::new(Activations::F32(&x, q), geometry);
            let patches = Im2Col { image: &padded };
            let mut y = vec![0f32; n * 64 * 64];
            let product_ms = best_of_5(&mut || {
                let out = Output::F32(&mut y, dq);
                qmatmul(&patches, &packed, &requant, out, Layout::ColMajor).unwrap();
            });
            let mut y = vec![0f32; n * 64 * 64];
            let row_major_ms = best_of_5(&mut || {
                let out = Output::F32(&mut y, dq);
                qmatmul(&patches, &packed, &requant, out, Layout::RowMajor).unwrap();
            });
            eprintln!(
                "{} neck 3x3 ({:.2} GMAC), {threads} thread(s): padded copy {pad_ms:.2} ms, \
                 product {product_ms:.2} ms (column-major out), {row_major_ms:.2} ms (row-major)",
                kernel.report_name(),
                (geometry.pixels() * k * n) as f64 / 1e9
            );
        });
    }
}

/// The speed tools' requantization of `n` columns (bias per column, `scale` for all), input
/// quantization and output dequantization.
fn speed_requantization(n: usize, scale: f32) -> (Requant, Quantize, Dequantize) {
    let requant = Requant {
        bias: (0..n).map(|j| j as i32 * 37 - 200).collect(),
        scale: vec![scale; n],
        zero_point: 0,
    };
    let q = Quantize {
        scale: 50.0,
        zero_point: 0,
    };
    let dq = Dequantize {
        scale: 0.05,
        zero_point: 0,
    };
    (requant, q, dq)
}

/// The shortest of 5 runs of `f`, in ms.
fn best_of_5(f: &mut dyn FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::MAX, f64::min)
}
