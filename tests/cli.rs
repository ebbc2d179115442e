//! The `tinysam` and `tinysam-ros2` binaries end to end on the fixture model.

use std::process::Command;

use crate::util::{fixtures, test_model};

fn tinysam() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tinysam"))
}

#[test]
fn segment_writes_masks_overlay_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("seg");
    let out = tinysam()
        .arg("segment")
        .arg(fixtures().join("golden/frame.png"))
        .args([
            "--point",
            "100,75",
            "--point",
            "150,100,0",
            "--box",
            "30,20,170,130",
            "--all-masks",
        ])
        .arg("--model")
        .arg(test_model())
        .arg("--out")
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("seg.json")).unwrap())
            .unwrap();
    let masks = json["prompts"][0]["masks"].as_array().unwrap();
    assert_eq!(masks.len(), 3);
    // COCO compressed RLE, as pycocotools takes it, and the PNG each mask went to.
    assert!(masks[0]["rle"]["counts"].is_string());
    assert_eq!(masks[0]["rle"]["size"], serde_json::json!([150, 200]));
    assert_eq!(
        masks[2]["file"].as_str().unwrap(),
        dir.path().join("seg.mask-2.png").to_str().unwrap()
    );
    // Best first: scores do not increase down the list.
    let scores: Vec<f64> = masks.iter().map(|m| m["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    // Compact JSON: one line.
    let text = std::fs::read_to_string(dir.path().join("seg.json")).unwrap();
    assert_eq!(text.lines().count(), 1);
    let overlay = image::open(dir.path().join("seg.overlay.png")).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (200, 150));
    let mask = image::open(dir.path().join("seg.mask-0.png"))
        .unwrap()
        .to_luma8();
    let area = mask.as_raw().iter().filter(|&&v| v == 255).count() as u64;
    assert_eq!(area, masks[0]["area"].as_u64().unwrap());
}

/// Run `cmd`, expect failure and an error message containing `needle`.
fn assert_fails_with(cmd: &mut Command, needle: &str) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded; stderr: {stderr}");
    assert!(
        stderr.contains(needle),
        "{needle:?} not in stderr: {stderr}"
    );
}

#[test]
fn segment_reports_bad_input_clearly() {
    assert_fails_with(
        tinysam().args(["segment", "/nonexistent.png", "--point", "1,1"]),
        "/nonexistent.png",
    );
    assert_fails_with(
        tinysam().args(["segment", "x.png", "--point", "1;2"]),
        "x,y[,label]",
    );
    assert_fails_with(
        tinysam()
            .arg("segment")
            .arg(fixtures().join("golden/frame.png"))
            .args(["--point", "5000,5"])
            .arg("--model")
            .arg(test_model())
            .arg("--out")
            .arg(std::env::temp_dir().join("tinysam-cli-outside")),
        "outside the 200x150 image",
    );
    // Prompts are checked before the model loads and the frame encodes: with a model
    // directory that does not exist, the prompt's error is still the one reported.
    assert_fails_with(
        tinysam()
            .arg("segment")
            .arg(fixtures().join("golden/frame.png"))
            .args([
                "--point",
                "10,10",
                "--point",
                "5000,5",
                "--model",
                "/nonexistent/model",
            ]),
        "prompt 0: point 1 (5000, 5) is outside the 200x150 image",
    );
    // A truncated JPEG is refused by name, not segmented with its missing part grey.
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.jpg");
    let mut jpeg = Vec::new();
    image::open(fixtures().join("golden/frame.png"))
        .unwrap()
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    std::fs::write(&cut, &jpeg[..jpeg.len() / 2]).unwrap();
    assert_fails_with(
        tinysam()
            .arg("segment")
            .arg(&cut)
            .args(["--point", "5,5", "--model"])
            .arg(test_model())
            .arg("--out")
            .arg(dir.path().join("seg")),
        "image does not decode",
    );
}

#[test]
fn info_reports_isa_and_kernels() {
    let out = tinysam()
        .arg("info")
        .arg("--model")
        .arg(test_model())
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["isa"].as_str().unwrap().len() > 2);
    assert!(v["encoder"]["kernels"]["nodes"].as_array().unwrap().len() > 5);
}

/// A reader that stops early (`| head -1`, `| grep -q`) ends the CLI quietly, by SIGPIPE as
/// other Unix tools end, not with a panic in `println!`.
#[test]
fn closed_stdout_ends_quietly() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;

    let mut child = tinysam()
        .arg("info")
        .arg("--model")
        .arg(test_model())
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the pipe before the CLI writes: its first write fails.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.signal(), Some(13), "{status:?}: {stderr}");
}

/// `segment --everything` reports its progress on stderr (not a terminal here: a line per round
/// at least, its last with every point decoded) and writes the masks' JSON.
#[test]
fn segment_everything_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("all");
    let out = tinysam()
        .arg("segment")
        .arg(fixtures().join("golden/frame.png"))
        .args(["--everything", "--points-per-side", "8", "--model"])
        .arg(test_model())
        .arg("--out")
        .arg(&prefix)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("everything: round"))
        .collect();
    assert!(
        progress
            .iter()
            .any(|l| l.starts_with("everything: round 1: 4/4 points decoded")),
        "{stderr}"
    );
    let last = progress.last().expect("progress lines");
    let counts = last
        .strip_prefix("everything: round 2: ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|f| f.split_once('/'))
        .unwrap_or_else(|| panic!("no round 2 line: {stderr}"));
    assert_eq!(counts.0, counts.1, "{last}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("all.json")).unwrap())
            .unwrap();
    assert_eq!(
        json["stats"]["decoder_prompts"].as_u64().unwrap(),
        4 + counts.0.parse::<u64>().unwrap()
    );
}

/// `cross/vm/run.sh` looks for the binaries where cargo puts them (`CARGO_TARGET_DIR` honoured)
/// and before any download: with an empty target directory and `VM_NO_BUILD=1` it fails at once,
/// naming that directory, and its download cache stays empty.
#[test]
fn vm_script_finds_binaries_through_cargo_before_downloading() {
    let target = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/cross/vm/run.sh"))
        .arg("x86_64")
        .env("CARGO_TARGET_DIR", target.path())
        .env("TINYSAM_CACHE", cache.path())
        .env("VM_NO_BUILD", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let expected = format!("missing binaries in {}/release", target.path().display());
    assert!(stderr.contains(&expected), "{stderr}");
    let downloaded: Vec<_> = std::fs::read_dir(cache.path().join("vm"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        downloaded.is_empty(),
        "downloads before the check: {downloaded:?}"
    );
}

/// `tinysam-ros2` refuses a bad configuration before touching the network, with the key named
/// and systemd's EX_CONFIG (78), and prints a good one with `--check-config`.
#[test]
fn ros2_bridge_checks_its_configuration() {
    let bridge = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tinysam-ros2"));
        c.env_remove("TINYSAMD_CONFIG").env_remove("ROS_DOMAIN_ID");
        c
    };
    for (args, env, needle) in [
        (vec!["--domain-id", "300"], None, "ros2.domain_id"),
        (vec!["--check-config"], Some("x1"), "ROS_DOMAIN_ID"),
        (vec!["--namespace", "robot"], None, "ros2.namespace"),
        (vec!["--box", "9,9,1,1"], None, "ros2.boxes"),
        (vec!["--transport", "xrce"], None, "ros2.transport"),
        (
            vec![
                "--transport",
                "zenoh",
                "--zenoh-router",
                "udp/10.0.0.1:7447",
            ],
            None,
            "ros2.zenoh_router",
        ),
    ] {
        let mut cmd = bridge();
        cmd.args(&args);
        if let Some(v) = env {
            cmd.env("ROS_DOMAIN_ID", v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let out = bridge()
        .args(["--check-config", "--point", "10,20", "--node-name", "seg"])
        .env("ROS_DOMAIN_ID", "5")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("domain id 5"), "{stdout}");
    assert!(stdout.contains("node_name = \"seg\""), "{stdout}");
    assert!(stdout.contains("\"10,20,1\""), "{stdout}");
}

/// `tinysam fidelity IMAGE --model <fixture> --json JSON`, which must succeed: its stdout and
/// the report.
fn fidelity_report(image: &std::path::Path, json: &std::path::Path) -> (String, serde_json::Value) {
    let out = tinysam()
        .arg("fidelity")
        .arg(image)
        .arg("--model")
        .arg(test_model())
        .arg("--json")
        .arg(json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (stdout, report)
}

#[test]
fn fidelity_reports_every_mixture_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fidelity.json");
    let (stdout, report) = fidelity_report(&fixtures().join("golden/frame.png"), &json);
    assert!(stdout.contains("embedding cosine"), "{stdout}");
    // The fixture ships an exported INT8 decoder file.
    assert_eq!(report["int8_decoder"], "file");
    let share = report["integer_share"]["encoder"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&share), "{share}");
    let images = report["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["size"], serde_json::json!([150, 200]));
    assert_eq!(images[0]["skipped"], serde_json::json!([]));
    let cosine = images[0]["embedding_cosine"].as_f64().unwrap();
    assert!(cosine > 0.9 && cosine <= 1.0 + 1e-9, "{cosine}");
    for key in [
        "int8_encoder_int8_decoder",
        "int8_encoder_fp32_decoder",
        "fp32_encoder_int8_decoder",
    ] {
        let rows = images[0]["mixtures"][key].as_array().unwrap();
        assert_eq!(rows.len(), 7, "{key}: five points and two boxes");
        for row in rows {
            let iou = row["mask_iou"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&iou), "{key}: {row}");
            assert!(row["iou_score_error"].as_f64().unwrap() >= 0.0);
        }
        let summary = &report["summary"][key];
        assert_eq!(summary["prompts"], 7);
        let mean = summary["mean_mask_iou"].as_f64().unwrap();
        assert!(
            mean >= summary["min_mask_iou"].as_f64().unwrap(),
            "{summary}"
        );
    }
    // A frame one pixel wide keeps its points and skips the boxes, saying why.
    let thin = dir.path().join("thin.png");
    image::RgbImage::from_pixel(1, 40, image::Rgb([90, 120, 30]))
        .save(&thin)
        .unwrap();
    let (_, report) = fidelity_report(&thin, &json);
    let thin_frame = &report["images"][0];
    let skipped = thin_frame["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{thin_frame}");
    let rows = thin_frame["mixtures"]["int8_encoder_int8_decoder"].as_array();
    assert_eq!(rows.map(Vec::len), Some(5), "{thin_frame}");
    // A missing image is named.
    assert_fails_with(
        tinysam()
            .arg("fidelity")
            .arg(dir.path().join("missing.png"))
            .arg("--model")
            .arg(test_model()),
        "missing.png",
    );
}
