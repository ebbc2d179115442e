use super::*;
use crate::model::decoder::f32_slice;
use crate::model::ops::w8a16::W8Weights;
use crate::model::qmatmul::rewrite_gelu;
use crate::model::test_support::{
    decluttered_encoder, fixture_dir, gelu_f64 as gelu, golden_input, max_difference,
    pattern_input, pattern_values as pattern, run_first_output, same_bits_on_every_w8a16_kernel,
};
use crate::model::Precision;

/// The block in f64 straight from its definition, on CHW `input`.
fn reference(w: &RawWeights, g: &Geometry, finish: Finish, input: &[f32]) -> Vec<f32> {
    let (cin, hid, cout) = (w.cin, w.hidden, w.cout);
    let (h, wd) = (g.height, g.width);
    let (oh, ow) = g.output();
    let x = |c: usize, y: usize, xx: usize| f64::from(input[(c * h + y) * wd + xx]);
    let mut hidden = vec![0f64; hid * h * wd];
    for o in 0..hid {
        for y in 0..h {
            for xx in 0..wd {
                let s: f64 = (0..cin)
                    .map(|i| f64::from(w.expand[o * cin + i]) * x(i, y, xx))
                    .sum();
                hidden[(o * h + y) * wd + xx] = gelu(s + f64::from(w.expand_bias[o]));
            }
        }
    }
    let mut mid = vec![0f64; hid * oh * ow];
    for c in 0..hid {
        for y in 0..oh {
            for xx in 0..ow {
                let mut s = f64::from(w.depthwise_bias[c]);
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) = (
                            (y * g.stride + ky) as isize - 1,
                            (xx * g.stride + kx) as isize - 1,
                        );
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                            continue;
                        }
                        s += f64::from(w.depthwise[c * 9 + ky * 3 + kx])
                            * hidden[(c * h + iy as usize) * wd + ix as usize];
                    }
                }
                mid[(c * oh + y) * ow + xx] = gelu(s);
            }
        }
    }
    let mut out = vec![0f32; cout * oh * ow];
    for o in 0..cout {
        for p in 0..oh * ow {
            let s: f64 = (0..hid)
                .map(|i| f64::from(w.project[o * hid + i]) * mid[i * oh * ow + p])
                .sum::<f64>()
                + f64::from(w.project_bias[o]);
            match finish {
                Finish::Residual => {
                    out[o * oh * ow + p] = gelu(s + f64::from(input[o * h * wd + p])) as f32
                }
                Finish::Tokens => out[p * cout + o] = s as f32,
            }
        }
    }
    out
}

/// Weights as the ONNX graph holds them (OI kernels, OIHW depthwise).
struct RawWeights {
    cin: usize,
    hidden: usize,
    cout: usize,
    expand: Vec<f32>,
    expand_bias: Vec<f32>,
    depthwise: Vec<f32>,
    depthwise_bias: Vec<f32>,
    project: Vec<f32>,
    project_bias: Vec<f32>,
}

impl RawWeights {
    fn new(cin: usize, hidden: usize, cout: usize) -> RawWeights {
        RawWeights {
            cin,
            hidden,
            cout,
            expand: pattern(hidden * cin, 1, 0.4),
            expand_bias: pattern(hidden, 2, 0.3),
            depthwise: pattern(hidden * 9, 3, 0.6),
            depthwise_bias: pattern(hidden, 4, 0.2),
            project: pattern(cout * hidden, 5, 0.25),
            project_bias: pattern(cout, 6, 0.3),
        }
    }

    /// The op, with f32 products or (`integer`) W8A16 ones on that kernel.
    fn op(&self, g: Geometry, finish: Finish, integer: Option<W8A16Kernel>) -> MbConv {
        let pack = |t: &[f32], o: usize, i: usize| {
            let t = Tensor::from_shape(&[o, i], t).expect("shape");
            pointwise_weights(&t, o, i).expect("pack").expect("f32")
        };
        let (expand_rows, expand) = pack(&self.expand, self.hidden, self.cin);
        let (project_rows, project) = pack(&self.project, self.cout, self.hidden);
        let c = self.hidden;
        let (oh, ow) = g.output();
        MbConv {
            geometry: g,
            finish,
            output_shape: match finish {
                Finish::Residual => tvec![1, self.cout, oh, ow],
                Finish::Tokens => tvec![oh * ow, self.cout],
            },
            weights: Arc::new(Weights {
                expand,
                expand_bias: self.expand_bias.clone(),
                depthwise: (0..TAPS * c)
                    .map(|at| self.depthwise[(at % c) * TAPS + at / c])
                    .collect(),
                depthwise_bias: self.depthwise_bias.clone(),
                project,
                project_bias: self.project_bias.clone(),
                integer: integer.map(|kernel| {
                    ProductPair::quantize(
                        kernel,
                        (&expand_rows, self.cin, self.hidden),
                        (&project_rows, self.hidden, self.cout),
                    )
                    .expect("quantized")
                }),
            }),
        }
    }
}

#[test]
fn every_kernel_matches_a_double_precision_block() -> TractResult<()> {
    let isas = Isa::runnable();
    // Residual blocks (stride 1) and merging (stride 2, odd and even sides, channels that fill
    // no whole panel or product block).
    for (cin, hidden, cout, height, width, stride, finish, pixel_major) in [
        (8, 32, 8, 7, 9, 1, Finish::Residual, false),
        (5, 20, 5, 4, 3, 1, Finish::Residual, false),
        (6, 24, 10, 9, 8, 2, Finish::Tokens, false),
        (4, 36, 33, 6, 7, 2, Finish::Tokens, true),
        (7, 16, 9, 5, 5, 1, Finish::Tokens, true),
        (1, 3, 1, 1, 1, 1, Finish::Residual, false),
    ] {
        let raw = RawWeights::new(cin, hidden, cout);
        let g = Geometry {
            height,
            width,
            stride,
            pixel_major_input: pixel_major,
        };
        let op = raw.op(g, finish, None);
        let planes = pattern(cin * height * width, 7, 2.0);
        let want = reference(&raw, &g, finish, &planes);
        // The same image pixel-major, where the block takes tokens.
        let input: Vec<f32> = if pixel_major {
            (0..planes.len())
                .map(|at| planes[(at % cin) * height * width + at / cin])
                .collect()
        } else {
            planes
        };
        for &isa in &isas {
            let mut got = vec![0f32; want.len()];
            op.run(isa, &input, &mut got)?;
            let (err, scale) = max_difference(&got, &want);
            assert!(
                err <= 2e-6 * scale.max(1.0),
                "{isa} {cin}→{hidden}→{cout} {height}×{width} stride {stride} {pixel_major}: {err} \
                 of {scale}"
            );
        }
    }
    Ok(())
}

/// With W8A16 products the block is the definition on the quantized weights, up to the
/// activations' 16-bit rounding; every integer kernel gives the same bits.
#[test]
fn integer_products_follow_the_quantized_weights() -> TractResult<()> {
    let kernels = W8A16Kernel::supported();
    for (cin, hidden, cout, height, width, stride, finish) in [
        (8, 32, 8, 7, 9, 1, Finish::Residual),
        (6, 24, 10, 9, 8, 2, Finish::Tokens),
        (5, 36, 33, 6, 7, 2, Finish::Tokens),
    ] {
        let raw = RawWeights::new(cin, hidden, cout);
        let g = Geometry {
            height,
            width,
            stride,
            pixel_major_input: false,
        };
        let input = pattern(cin * height * width, 7, 2.0);
        // The weights as the integer products see them.
        let mut quantized = RawWeights::new(cin, hidden, cout);
        let as_used = |w: &[f32], o: usize, i: usize| {
            let t: Vec<f32> = (0..i * o).map(|at| w[(at % o) * i + at / o]).collect();
            let dq = W8Weights::quantize(&t, i, o).expect("sizes").dequantized();
            (0..o * i)
                .map(|at| dq[(at % i) * o + at / i])
                .collect::<Vec<f32>>()
        };
        quantized.expand = as_used(&raw.expand, hidden, cin);
        quantized.project = as_used(&raw.project, cout, hidden);
        let want = reference(&quantized, &g, finish, &input);
        let float = reference(&raw, &g, finish, &input);
        same_bits_on_every_w8a16_kernel(&kernels, |kernel| {
            let op = raw.op(g, finish, Some(kernel));
            let mut got = vec![0f32; want.len()];
            op.run(Isa::detect(), &input, &mut got)?;
            let (err, scale) = max_difference(&got, &want);
            assert!(
                err <= 2e-4 * scale.max(1.0),
                "{kernel:?} {cin}→{hidden}→{cout}: {err} of {scale} from the quantized weights"
            );
            let (err, scale) = max_difference(&got, &float);
            assert!(
                err <= 3e-2 * scale.max(1.0),
                "{kernel:?} {cin}→{hidden}→{cout}: {err} of {scale} from the f32 block"
            );
            Ok(got)
        })?;
    }
    Ok(())
}

#[test]
fn sizes_that_do_not_fit_are_an_error() {
    let raw = RawWeights::new(4, 8, 4);
    let g = Geometry {
        height: 3,
        width: 3,
        stride: 1,
        pixel_major_input: false,
    };
    let op = raw.op(g, Finish::Residual, None);
    let mut out = vec![0f32; 36];
    assert!(op.run(Isa::detect(), &[0.0; 35], &mut out).is_err());
    assert!(op.run(Isa::detect(), &[0.0; 36], &mut out[..30]).is_err());
}

/// Every block of `dir`'s encoder at `precision`, fed the input tract computes for the golden
/// frame, against tract's own output of the chain it replaces: the blocks of each kind, and
/// the largest error relative to the output's largest value.
fn against_tract(dir: &std::path::Path, precision: Precision) -> TractResult<(usize, usize, f32)> {
    let (mut typed, _) = decluttered_encoder(dir, precision);
    rewrite_gelu(&mut typed)?;
    let mut plans = Vec::new();
    for id in typed.eval_order()? {
        let is_expansion = typed.node(id).op_as::<EinSum>().is_some_and(is_expansion);
        if is_expansion {
            if let Ok(Some(p)) = plan(&typed, id, None)? {
                plans.push(p);
            }
        }
    }
    let mut probe = typed.clone();
    let outlets: Vec<OutletId> = plans.iter().flat_map(|p| [p.inputs[0], p.output]).collect();
    probe.select_output_outlets(&outlets)?;
    let runnable = probe.into_optimized()?.into_runnable()?;
    let outs = runnable.run(tvec!(golden_input(dir).into()))?;
    let mut worst = 0f32;
    for (i, p) in plans.iter().enumerate() {
        let got =
            p.op.eval(&EvalContext::out_of_plan(), tvec!(outs[2 * i].clone()))?;
        let (err, scale) = max_difference(f32_slice(&got[0]), f32_slice(&outs[2 * i + 1]));
        worst = worst.max(err / scale.max(1e-6));
    }
    let residual = plans
        .iter()
        .filter(|p| p.op.finish == Finish::Residual)
        .count();
    Ok((residual, plans.len() - residual, worst))
}

#[test]
fn fused_blocks_equal_tracts_subgraphs_on_the_fixture() -> TractResult<()> {
    // The fixture's INT8 file quantizes stage 0 too (no float blocks); its FP32 file has them
    // all: stage 0's two MBConv blocks, and the patch merging that ends stages 0, 1 and 2.
    let (mbconv, merging, err) = against_tract(&fixture_dir(), Precision::Fp32)?;
    eprintln!("fixture: {mbconv} MBConv, {merging} patch merging, largest relative error {err:e}");
    assert_eq!((mbconv, merging), (2, 3));
    assert!(err < 1e-5, "relative error {err}");
    Ok(())
}

/// The shipped model at 1024²: its INT8 file keeps stage 0 float (the two MBConv blocks and
/// the first patch merging) and the second patch merging, which the quantization search found
/// over its error budget (`models/default/manifest.json`); the last merge has int8 products.
/// Only on x86_64 (under qemu the encoder takes minutes).
#[cfg(target_arch = "x86_64")]
#[test]
fn fused_blocks_equal_tracts_subgraphs_on_the_default_model() -> TractResult<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    let (mbconv, merging, err) = against_tract(&dir, Precision::Int8)?;
    eprintln!(
        "default model: {mbconv} MBConv, {merging} patch merging, largest relative error {err:e}"
    );
    assert_eq!((mbconv, merging), (2, 2));
    assert!(err < 1e-5, "relative error {err}");
    Ok(())
}

/// The whole fixture encoder with and without the rewrite: the embedding moves by rounding only.
#[test]
fn the_fixture_encoder_keeps_its_embedding() -> TractResult<()> {
    let (mut tract_blocks, s) = decluttered_encoder(&fixture_dir(), Precision::Fp32);
    rewrite_gelu(&mut tract_blocks)?;
    let mut ours = tract_blocks.clone();
    assert_eq!(rewrite_mbconv(&mut ours, None)?, 5);
    assert_eq!(
        ours.nodes().iter().filter(|n| n.op_is::<MbConv>()).count(),
        5
    );
    let input = pattern_input(s);
    let (err, scale) = max_difference(
        &run_first_output(ours, &input)?,
        &run_first_output(tract_blocks, &input)?,
    );
    eprintln!("fixture FP32 encoder with fused blocks: largest difference {err:e} of {scale}");
    assert!(err <= 1e-4 * scale.max(1.0), "{err} of {scale}");
    Ok(())
}

/// Speed of stage 0's blocks at the default model's size (an MBConv 64 → 256 → 64 on 256 × 256,
/// the patch merging 64 → 128 → 128 with stride 2) per compiled form, on one thread: best of 3.
/// `cargo test --release --lib -- --ignored mbconv_speed --nocapture`.
#[test]
#[ignore]
fn mbconv_speed() -> TractResult<()> {
    for (cin, hidden, cout, stride, finish) in [
        (64, 256, 64, 1, Finish::Residual),
        (64, 128, 128, 2, Finish::Tokens),
    ] {
        let raw = RawWeights::new(cin, hidden, cout);
        let g = Geometry {
            height: 256,
            width: 256,
            stride,
            pixel_major_input: false,
        };
        let input = pattern(cin * 256 * 256, 7, 2.0);
        let (oh, ow) = g.output();
        let mut out = vec![0f32; cout * oh * ow];
        let integer = W8A16Kernel::supported().into_iter().map(Some);
        for products in std::iter::once(None).chain(integer) {
            let op = raw.op(g, finish, products);
            for isa in Isa::runnable() {
                let mut best = f64::MAX;
                for _ in 0..3 {
                    let t = std::time::Instant::now();
                    op.run(isa, &input, &mut out)?;
                    best = best.min(t.elapsed().as_secs_f64() * 1e3);
                }
                eprintln!(
                    "{cin} → {hidden} → {cout}, stride {stride}, {isa}, {} products: {best:.1} \
                     ms, {:.1} GMAC/s",
                    products.map_or("f32", |k| k.name()),
                    op.macs() as f64 / best / 1e6
                );
            }
        }
    }
    Ok(())
}
