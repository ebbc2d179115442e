//! Segment-everything on the fixture model: prompt counts, the hierarchical skip rule, agreement.

use tinysam_edge::everything::{
    agreement, point_grid, EverythingParams, Generator, Progress, Strategy,
};
use tinysam_edge::postprocess::Upsampler;

use crate::util::fixtures;

/// A square frame whose 8x8 grid points sit on pixel centres (200 / 8 = 25, odd).
fn frame() -> image::RgbImage {
    let img = image::open(fixtures().join("golden/frame.png"))
        .unwrap()
        .to_rgb8();
    image::imageops::resize(&img, 200, 200, image::imageops::FilterType::Triangle)
}

fn params(strategy: Strategy) -> EverythingParams {
    EverythingParams {
        strategy,
        points_per_side: 8,
        points_per_batch: 16,
        // The synthetic model's IoU predictions sit near 0.88 and its masks are noisy:
        // lower thresholds so that masks survive and the rules get exercised.
        pred_iou_thresh: 0.5,
        stability_score_thresh: 0.3,
        high_confidence_logit: 8.5,
        ..EverythingParams::default()
    }
}

#[test]
fn hierarchical_skips_exactly_the_done_points() {
    // FP32: the same masks on every architecture, so the same points are done everywhere.
    let seg = crate::util::segmenter(Some(tinysam_edge::model::Precision::Fp32));
    let emb = seg.embed(&frame()).unwrap();
    let flat = Generator::new(seg, params(Strategy::Flat))
        .run(&emb)
        .unwrap();
    assert_eq!(flat.stats.decoder_prompts, 64);
    assert!(
        !flat.masks.is_empty(),
        "thresholds leave no mask: {:?}",
        flat.stats
    );

    let p = params(Strategy::Hierarchical);
    let reports = std::cell::RefCell::new(Vec::new());
    let report = |r: Progress| {
        reports.borrow_mut().push(r);
        std::ops::ControlFlow::Continue(())
    };
    let hier = Generator::new(seg, p.clone())
        .on_progress(&report)
        .run(&emb)
        .unwrap();
    // Independent recomputation of round 1 and the done rule at frame resolution.
    let sparse = point_grid(2, 200, 200);
    let first = Generator::new(seg, p.clone())
        .decode_points(&emb, &sparse)
        .unwrap();
    let up = Upsampler::new(emb.geometry, seg.mask_size());
    let logits: Vec<Vec<f32>> = first.iter().map(|r| up.logits(&r.low_res_logits)).collect();
    let expected: Vec<(f32, f32)> = point_grid(8, 200, 200)
        .into_iter()
        .filter(|&(x, y)| {
            let i = (y as usize) * 200 + x as usize;
            logits.iter().any(|l| l[i] > p.high_confidence_logit)
        })
        .collect();
    assert!(
        !expected.is_empty(),
        "no point is done: raise the test's coverage"
    );
    assert_eq!(hier.skipped, expected);
    assert_eq!(hier.stats.decoder_prompts, 4 + 64 - expected.len());
    assert!(hier.stats.decoder_prompts < flat.stats.decoder_prompts);
    // Progress after every decoder batch of 16: round 1's 4 points in one, round 2's in order.
    let round2 = 64 - expected.len();
    let mut want = vec![Progress {
        round: 1,
        done: 4,
        total: 4,
    }];
    want.extend((1..=round2.div_ceil(16)).map(|k| Progress {
        round: 2,
        done: (16 * k).min(round2),
        total: round2,
    }));
    assert_eq!(reports.into_inner(), want);

    // A report that says stop ends the pass after that batch, with `Stopped`.
    let batches = std::cell::Cell::new(0);
    let stop_after_two = |_: Progress| {
        batches.set(batches.get() + 1);
        if batches.get() == 2 {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    };
    let stopped = Generator::new(seg, p.clone())
        .on_progress(&stop_after_two)
        .run(&emb);
    assert!(
        matches!(stopped, Err(tinysam_edge::Error::Stopped { .. })),
        "{stopped:?}"
    );
    assert_eq!(batches.get(), 2, "no batch after the stop");

    let a: Vec<_> = flat.masks.iter().map(|m| &m.mask).collect();
    let b: Vec<_> = hier.masks.iter().map(|m| &m.mask).collect();
    let agree = agreement(&a, &b);
    println!(
        "flat {} masks, hierarchical {} masks, agreement {agree:.3}",
        a.len(),
        b.len()
    );
    assert!((0.0..=1.0).contains(&agree));
    assert!(
        hier.masks.windows(2).all(|w| w[0].area >= w[1].area),
        "sorted by area"
    );
}

#[test]
fn small_region_cleanup_keeps_masks_consistent() {
    let seg = crate::util::segmenter(None);
    let emb = seg.embed(&frame()).unwrap();
    let p = EverythingParams {
        min_mask_region_area: 50,
        ..params(Strategy::Flat)
    };
    let r = Generator::new(seg, p).run(&emb).unwrap();
    for m in &r.masks {
        assert_eq!(
            m.area,
            m.mask.data.iter().map(|&v| u64::from(v)).sum::<u64>()
        );
        assert!(m.area > 0);
    }
}
