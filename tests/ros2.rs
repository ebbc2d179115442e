//! The ROS 2 bridge's daemon side against a live in-process daemon, with a recorder in place of
//! the middleware: standing results become label images and detections that agree with the
//! masks, topic prompts are answered with their detection's index as class id, malformed ones are
//! refused and counted, and the bridge reconnects when the daemon restarts. (The DDS side, with an
//! independent Cyclone DDS peer in network namespaces, is `tests/ros2/test_dds_peer.py`.)

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tinysam_edge::daemon::DaemonOptions;
use tinysam_edge::protocol::WirePrompt;
use tinysam_edge::ros2::messages::{
    BoundingBox2D, Detection2D, Detection2DArray, Point, Point2D, PointStamped, Pose2D,
};
use tinysam_edge::ros2::{Bridge, BridgeOptions, FrameOutput, Publish, Standing};

use crate::daemon::{serial, settings, start, synthetic_320x240};

/// Everything the bridge published.
#[derive(Default)]
struct Recorder(Mutex<Vec<FrameOutput>>);

impl Publish for Recorder {
    fn publish(&self, output: FrameOutput) -> Result<(), String> {
        self.0.lock().unwrap().push(output);
        Ok(())
    }
}

impl Recorder {
    /// Wait up to 60 s for an output that `pick` accepts.
    fn wait_for(&self, what: &str, pick: impl Fn(&FrameOutput) -> bool) -> FrameOutput {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(o) = self.0.lock().unwrap().iter().rev().find(|o| pick(o)) {
                return o.clone();
            }
            assert!(Instant::now() < until, "no {what} within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

fn box_detection(cx: f64, cy: f64, w: f64, h: f64) -> Detection2D {
    Detection2D {
        bbox: BoundingBox2D {
            center: Pose2D {
                position: Point2D { x: cx, y: cy },
                theta: 0.0,
            },
            size_x: w,
            size_y: h,
        },
        ..Default::default()
    }
}

/// The label image's pixels as u16.
fn labels(o: &FrameOutput) -> Vec<u16> {
    let image = o.label_image.as_ref().expect("a label image");
    image
        .data
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

#[test]
fn bridge_publishes_answers_refuses_and_reconnects() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = settings(dir.path(), &synthetic_320x240("10"), "");
    let socket = config.socket_path.clone();
    let daemon = start(config.clone(), DaemonOptions::default());

    let standing = vec![
        WirePrompt {
            points: vec![(160.0, 120.0, 1)],
            bbox: None,
        },
        WirePrompt {
            points: Vec::new(),
            bbox: Some([20.0, 20.0, 140.0, 110.0]),
        },
    ];
    let bridge = Arc::new(Bridge::new(BridgeOptions {
        socket: socket.clone(),
        client_name: "ros2 test".into(),
        standing: Standing::Prompts(standing),
        max_rate_hz: 0.0,
        frame_id: "cam0".into(),
        publish_masks: true,
        publish_overlay: true,
    }));
    let recorder = Arc::new(Recorder::default());
    let runner = {
        let (bridge, recorder) = (Arc::clone(&bridge), Arc::clone(&recorder));
        std::thread::spawn(move || bridge.run(recorder.as_ref()))
    };

    // Standing results: one detection per prompt, ids 1 and 2, class ids the prompt indices,
    // boxes inside the frame, and a label image whose labels are exactly those ids.
    let out = recorder.wait_for("standing result", |o| o.detections.detections.len() == 2);
    let d = &out.detections;
    assert_eq!(d.header.frame_id, "cam0");
    let ids: Vec<&str> = d.detections.iter().map(|x| x.id.as_str()).collect();
    assert_eq!(ids, ["1", "2"]);
    let classes: Vec<&str> = d
        .detections
        .iter()
        .map(|x| x.results[0].hypothesis.class_id.as_str())
        .collect();
    assert_eq!(classes, ["0", "1"]);
    for det in &d.detections {
        let b = &det.bbox;
        assert!(b.size_x >= 0.0 && b.size_y >= 0.0 && b.size_x <= 320.0 && b.size_y <= 240.0);
        assert!((0.0..=1.5).contains(&det.results[0].hypothesis.score));
        assert_eq!(det.header, d.header);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let stamp = f64::from(d.header.stamp.sec) + f64::from(d.header.stamp.nanosec) * 1e-9;
    assert!((now - stamp).abs() < 30.0, "stamp {stamp} vs now {now}");
    let image = out.label_image.as_ref().unwrap();
    assert_eq!((image.width, image.height, image.step), (320, 240, 640));
    assert_eq!((image.encoding.as_str(), image.is_bigendian), ("mono16", 0));
    assert_eq!(image.header, d.header);
    let pixels = labels(&out);
    assert!(pixels.iter().all(|&v| v <= 2));
    // The overlay: the frame (sent by the daemon) with the labels drawn over it.
    let overlay = out.overlay.as_ref().expect("an overlay");
    assert_eq!(
        (overlay.format.as_str(), &overlay.header),
        ("jpeg", &d.header)
    );
    let picture = image::load_from_memory(&overlay.data).unwrap().to_rgb8();
    assert_eq!(picture.dimensions(), (320, 240));
    // Inside label 1's region (4-neighbours labelled alike), the red of colour 0 (230) is half
    // the pixel: at least 115, less the JPEG's error.
    let interior: Vec<u8> = (1..239usize)
        .flat_map(|y| (1..319usize).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            [(x, y), (x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)]
                .iter()
                .all(|&(a, b)| pixels[b * 320 + a] == 1)
        })
        .map(|(x, y)| picture.get_pixel(x as u32, y as u32).0[0])
        .collect();
    assert!(!interior.is_empty());
    let red = interior.iter().map(|&r| f64::from(r)).sum::<f64>() / interior.len() as f64;
    assert!(red >= 105.0, "mean red inside label 1: {red}");
    // Each labelled region lies inside its detection's box.
    for (i, det) in d.detections.iter().enumerate() {
        let b = &det.bbox;
        let (x0, y0) = (
            b.center.position.x - b.size_x / 2.0,
            b.center.position.y - b.size_y / 2.0,
        );
        let (x1, y1) = (x0 + b.size_x, y0 + b.size_y);
        for (p, &v) in pixels.iter().enumerate() {
            if usize::from(v) == i + 1 {
                let (x, y) = ((p % 320) as f64, (p / 320) as f64);
                assert!(
                    x >= x0 && x < x1 && y >= y0 && y < y1,
                    "label {v} at {x},{y}"
                );
            }
        }
    }

    // Topic prompts: a good box (index 1 of its message) between a NaN box and one outside the
    // frame, and a point outside the frame. The answer names index 1.
    let frame = bridge
        .frame_size()
        .expect("frame size from the status report");
    assert_eq!((frame.width, frame.height), (320, 240));
    recorder.clear();
    bridge.submit_detections(&Detection2DArray {
        detections: vec![
            box_detection(f64::NAN, 10.0, 5.0, 5.0),
            box_detection(100.0, 80.0, 120.0, 100.0),
            box_detection(1000.0, 1000.0, 10.0, 10.0),
        ],
        ..Default::default()
    });
    bridge.submit_point(&PointStamped {
        point: Point {
            x: 400.0,
            y: 10.0,
            z: 0.0,
        },
        ..Default::default()
    });
    let answer = recorder.wait_for("prompt answer", |o| o.detections.detections.len() == 1);
    assert!(
        answer.overlay.is_some(),
        "prompt answers carry the overlay too"
    );
    assert_eq!(
        answer.detections.detections[0].results[0]
            .hypothesis
            .class_id,
        "1"
    );
    assert_eq!(bridge.counters.prompts_rejected.load(Ordering::Relaxed), 3);
    assert_eq!(bridge.counters.prompts_sent.load(Ordering::Relaxed), 1);
    bridge.reject_unreadable("~/prompts", "unexpected end of input");
    assert_eq!(bridge.counters.prompts_rejected.load(Ordering::Relaxed), 4);

    // The daemon goes away and comes back on the same socket: the bridge reconnects by itself.
    daemon.shutdown(Duration::from_secs(10));
    recorder.clear();
    let daemon = start(config, DaemonOptions::default());
    recorder.wait_for("result after the restart", |o| {
        o.detections.detections.len() == 2
    });
    assert_eq!(bridge.counters.connections.load(Ordering::Relaxed), 2);

    bridge.stop();
    runner.join().expect("bridge thread");
    daemon.shutdown(Duration::from_secs(10));
}
