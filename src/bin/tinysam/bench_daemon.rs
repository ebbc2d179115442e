//! `tinysam bench --daemon`: the whole daemon in this process — synthetic camera, pipeline,
//! socket, one subscriber with a standing point prompt — timed from capture to receipt.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use tinysam_edge::client::Client;
use tinysam_edge::config::Config;
use tinysam_edge::daemon::{Daemon, DaemonOptions};
use tinysam_edge::metrics::percentile;
use tinysam_edge::protocol::{MaskEncoding, ServerMessage, Subscribe, SubscribeMode, WirePrompt};

use super::bench::{peak_rss_mib, BenchArgs};

/// Run the end-to-end benchmark; returns the Markdown it printed.
pub fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let dir = tempfile::tempdir().context("temporary socket directory")?;
    let model = args
        .model
        .clone()
        .unwrap_or_else(tinysam_edge::model::default_model_dir);
    let precision = args
        .precisions
        .first()
        .map(|p| p.to_string())
        .unwrap_or("auto".into());
    let text = format!(
        "[source]\nuri = \"synthetic\"\nwidth = 640\nheight = 480\nfps = {fps}\n\
         [model]\ndir = {model:?}\nencoder = \"{precision}\"\nthreads = {threads}\n\
         [socket]\npath = {sock:?}\nstall_timeout_ms = 600000\n[pipeline]\nstats_interval_s = 0\n",
        fps = args.daemon_fps,
        threads = args.threads,
        sock = dir.path().join("bench.sock"),
    );
    let settings = Config::from_toml(&text, std::path::Path::new("bench"))?.validate()?;
    let rss_before = peak_rss_mib();
    let daemon = Daemon::start(
        settings,
        DaemonOptions {
            ignore_socket_activation: true,
            ..DaemonOptions::default()
        },
    )?;
    let mut client = Client::connect(&daemon.settings.socket_path, "bench")?;
    client.subscribe(Subscribe {
        id: 1,
        mode: SubscribeMode::Prompts,
        prompts: vec![WirePrompt {
            points: vec![(320.0, 240.0, 1)],
            bbox: None,
        }],
        encoding: MaskEncoding::Rle,
        max_rate_hz: 0.0,
        multimask: false,
        frames: false,
    })?;
    let frames = args.runs.max(2);
    let mut latencies = Vec::with_capacity(frames);
    let mut first = true;
    while latencies.len() < frames {
        match client.recv(Some(Duration::from_secs(600)))? {
            ServerMessage::Masks(m) => {
                let ms = (tinysam_edge::monotonic_now_ns() - m.capture_ns) as f64 / 1e6;
                eprintln!("frame {}: {ms:.1} ms capture to receipt", m.frame_seq);
                // The first result includes plan warm-up: not counted.
                if !std::mem::take(&mut first) {
                    latencies.push(ms as f32);
                }
            }
            ServerMessage::Error(e) => anyhow::bail!("daemon error: {:?} {}", e.code, e.message),
            _ => {}
        }
    }
    let status = client.status(1)?;
    daemon.shutdown(Duration::from_secs(2));
    latencies.sort_by(f32::total_cmp);
    let stage = |name: &str| status.stages.iter().find(|s| s.stage == name);
    let p50 = |name: &str| stage(name).map_or(0.0, |s| s.p50_ms);
    let model_ms = p50("encode") + p50("decode");
    let e2e = percentile(&latencies, 0.5);
    let mut md = String::new();
    writeln!(
        md,
        "daemon end to end: synthetic 640x480 @ {} fps cap, model `{}` (encoder {}, decoder {}), \
         {} thread(s), {} frames after 1 warm-up, ISA {}",
        args.daemon_fps,
        model.display(),
        status.model.encoder,
        status.model.decoder,
        args.threads,
        latencies.len(),
        tinysam_edge::model::native_isa()
    )?;
    writeln!(md)?;
    writeln!(md, "| metric | value |")?;
    writeln!(md, "|---|---|")?;
    writeln!(md, "| encoder throughput | {:.3} fps |", status.fps)?;
    writeln!(md, "| capture → subscriber p50 | {e2e:.1} ms |")?;
    writeln!(
        md,
        "| capture → subscriber p95 | {:.1} ms |",
        percentile(&latencies, 0.95)
    )?;
    for s in &status.stages {
        writeln!(
            md,
            "| stage {} p50 / p95 | {:.1} / {:.1} ms |",
            s.stage, s.p50_ms, s.p95_ms
        )?;
    }
    writeln!(
        md,
        "| model time (encode + decode p50) | {model_ms:.1} ms |"
    )?;
    writeln!(
        md,
        "| overhead beyond model time | {:.1} ms = {:.1} % |",
        e2e - model_ms,
        100.0 * (e2e - model_ms) / e2e.max(1e-3)
    )?;
    writeln!(
        md,
        "| frames captured / encoded / dropped | {} / {} / {} |",
        status.frames_captured, status.frames_encoded, status.frames_dropped
    )?;
    writeln!(
        md,
        "| peak RSS (process, before daemon start) | {:.0} MiB ({rss_before:.0} MiB) |",
        peak_rss_mib()
    )?;
    println!("{md}");
    Ok(md)
}
