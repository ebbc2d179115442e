//! The daemon in-process on the fixture model: frames flow in order, latest-frame-wins under a
//! slow encoder, the embedding ring, camera loss and reopen, many subscribers and a stalled one.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use image::RgbImage;
use tinysam_edge::camera::{
    CameraError, CameraOpener, Frame, FrameSource, Reopening, SourceInfo, SyntheticSource,
};
use tinysam_edge::client::Client;
use tinysam_edge::config::{Config, Settings};
use tinysam_edge::daemon::{Daemon, DaemonOptions};
use tinysam_edge::monotonic_now_ns;
use tinysam_edge::pixel::PixelError;
use tinysam_edge::protocol::{
    ErrorCode, MaskEncoding, Masks, PromptRequest, ServerMessage, Subscribe, SubscribeMode,
    WirePrompt,
};

use crate::util::test_model;

/// Daemon tests measure latencies and frame drops: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Settings for the fixture model with `extra` TOML tables appended, socket in `dir`.
pub fn settings(dir: &Path, source: &str, extra: &str) -> Settings {
    let text = format!(
        "[source]\n{source}\n[model]\ndir = {:?}\nencoder = \"fp32\"\ndecoder = \"fp32\"\nthreads = 1\n\
         [socket]\npath = {:?}\nstall_timeout_ms = 500\n{extra}",
        test_model(),
        dir.join("d.sock"),
    );
    Config::from_toml(&text, Path::new("test.toml"))
        .and_then(|c| c.validate())
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The `[source]` lines of a 320x240 synthetic camera at `fps`.
pub fn synthetic_320x240(fps: &str) -> String {
    format!("uri = \"synthetic\"\nwidth = 320\nheight = 240\nfps = {fps}")
}

pub fn start(settings: Settings, options: DaemonOptions) -> Daemon {
    let options = DaemonOptions {
        ignore_socket_activation: true,
        ..options
    };
    Daemon::start(settings, options).expect("daemon starts")
}

fn point_prompt(x: f32, y: f32) -> WirePrompt {
    WirePrompt {
        points: vec![(x, y, 1)],
        bbox: None,
    }
}

pub fn subscribe(client: &mut Client, id: u32, mode: SubscribeMode, encoding: MaskEncoding) {
    let prompts = if mode == SubscribeMode::Prompts {
        vec![point_prompt(160.0, 120.0), point_prompt(40.0, 40.0)]
    } else {
        Vec::new()
    };
    client
        .subscribe(Subscribe {
            id,
            mode,
            prompts,
            encoding,
            max_rate_hz: 0.0,
            multimask: false,
            frames: false,
        })
        .unwrap();
}

/// Next `Masks` message, skipping others; panics on timeout.
pub fn next_masks(client: &mut Client) -> Masks {
    loop {
        match client
            .recv(Some(Duration::from_secs(20)))
            .expect("a message")
        {
            ServerMessage::Masks(m) => return m,
            ServerMessage::Error(e) => panic!("server error {e:?}"),
            _ => {}
        }
    }
}

fn socket(d: &Daemon) -> PathBuf {
    d.settings.socket_path.clone()
}

#[test]
fn frames_flow_in_order_with_standing_prompts() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), &synthetic_320x240("8"), "");
    let daemon = start(s, DaemonOptions::default());
    let mut c = Client::connect(&socket(&daemon), "order").unwrap();
    subscribe(&mut c, 1, SubscribeMode::Prompts, MaskEncoding::Rle);
    let mut last: Option<Masks> = None;
    for _ in 0..5 {
        let m = next_masks(&mut c);
        assert_eq!((m.width, m.height, m.subscription), (320, 240, Some(1)));
        // Two prompts, best mask each, in prompt order.
        assert_eq!(m.masks.iter().map(|k| k.prompt).collect::<Vec<_>>(), [0, 1]);
        for k in &m.masks {
            let rle = k.rle.as_ref().expect("rle");
            let decoded =
                tinysam_edge::postprocess::rle::Rle::from_compressed(rle, 320, 240).unwrap();
            assert_eq!(decoded.area(), k.area);
        }
        if let Some(prev) = &last {
            assert!(m.frame_seq > prev.frame_seq, "frames out of order");
            assert!(m.capture_ns > prev.capture_ns);
        }
        assert!(m.capture_ns <= monotonic_now_ns());
        last = Some(m);
    }
    let status = c.status(7).unwrap();
    assert_eq!(status.request_id, 7);
    assert!(status.frames_encoded >= 5);
    assert_eq!(status.clients.len(), 1);
    assert!(status
        .stages
        .iter()
        .any(|s| s.stage == "encode" && s.count >= 5));
    daemon.shutdown(Duration::from_secs(1));
    assert!(!dir.path().join("d.sock").exists(), "socket file removed");
}

/// A subscription or request that asks for frames gets each result's frame as JPEG (encoded once,
/// shared); one that does not, gets none. The frame is the source's picture.
#[test]
fn results_carry_their_frame_when_asked() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let png = crate::util::fixtures().join("golden/frame.png");
    let source = format!("uri = \"file:{}\"\nfps = 5", png.display());
    let daemon = start(settings(dir.path(), &source, ""), DaemonOptions::default());
    let mut with = Client::connect(&socket(&daemon), "frames").unwrap();
    with.subscribe(Subscribe {
        id: 1,
        mode: SubscribeMode::Prompts,
        prompts: vec![point_prompt(100.0, 75.0)],
        encoding: MaskEncoding::Rle,
        max_rate_hz: 0.0,
        multimask: false,
        frames: true,
    })
    .unwrap();
    let mut without = Client::connect(&socket(&daemon), "no frames").unwrap();
    subscribe(&mut without, 1, SubscribeMode::Prompts, MaskEncoding::Rle);
    let m = next_masks(&mut with);
    let jpeg = m.frame_jpeg.clone().expect("the frame");
    let got = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg)
        .unwrap()
        .to_rgb8();
    let want = image::open(&png).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), want.dimensions());
    assert_eq!(got.dimensions(), (m.width, m.height));
    let diff: Vec<u32> = got
        .pixels()
        .zip(want.pixels())
        .flat_map(|(a, b)| a.0.iter().zip(b.0).map(|(&a, b)| u32::from(a.abs_diff(b))))
        .collect();
    let mean = f64::from(diff.iter().sum::<u32>()) / diff.len() as f64;
    // Quality 85 on this textured fixture: ~3 grey levels on average (2.98 decoded by PIL).
    assert!(mean < 5.0, "JPEG vs the source: mean difference {mean}");
    assert_eq!(next_masks(&mut without).frame_jpeg, None);
    // A request on the same frame: the same JPEG (encoded once for the frame).
    with.request(PromptRequest {
        request_id: 7,
        frame_seq: Some(m.frame_seq),
        prompts: vec![point_prompt(50.0, 50.0)],
        encoding: MaskEncoding::Rle,
        multimask: false,
        frames: true,
    })
    .unwrap();
    let answer = loop {
        let r = next_masks(&mut with);
        if r.request_id == Some(7) {
            break r;
        }
    };
    assert_eq!(answer.frame_jpeg.as_deref(), Some(jpeg.as_slice()));
    daemon.shutdown(Duration::from_secs(1));
}

/// The service watchdog's view (`Daemon::stalled`): an encoder inside one frame for longer than
/// the limit is a stall (tinysamd then stops pinging systemd); a daemon whose `--once` file source
/// has ended is idle, never stalled, however long it waits.
#[test]
fn a_stalled_encoder_is_reported_an_idle_one_is_not() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = settings(
        dir.path(),
        "uri = \"synthetic\"\nwidth = 160\nheight = 120\nfps = 8",
        "",
    );
    let daemon = start(
        s,
        DaemonOptions {
            extra_encode_delay: Some(Duration::from_millis(1500)),
            ..DaemonOptions::default()
        },
    );
    let limit = Duration::from_millis(300);
    let until = Instant::now() + Duration::from_secs(20);
    let stalled = loop {
        if let Some(found) = daemon.stalled(limit) {
            break found;
        }
        assert!(
            Instant::now() < until,
            "an encode of 1.5 s never counted as a stall"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(stalled.0, "encoder");
    assert!(stalled.1 > limit, "{stalled:?}");
    // With a limit above the encode time it is progress, not a stall.
    for _ in 0..40 {
        assert_eq!(daemon.stalled(Duration::from_secs(10)), None);
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.shutdown(Duration::from_secs(3));

    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    RgbImage::from_pixel(160, 120, image::Rgb([90, 120, 150]))
        .save(frames.join("a.png"))
        .unwrap();
    let s = settings(
        dir.path(),
        &format!("uri = \"file:{}\"\nfps = 0\nloop = false", frames.display()),
        "",
    );
    let daemon = start(s, DaemonOptions::default());
    let mut c = Client::connect(&socket(&daemon), "idle").unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while c.status(1).unwrap().frames_encoded < 1 {
        assert!(Instant::now() < until, "the one frame was never encoded");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(daemon.stalled(Duration::from_millis(100)), None);
    daemon.shutdown(Duration::from_secs(1));
}

#[test]
fn latest_frame_wins_under_a_slow_encoder() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), &synthetic_320x240("50"), "");
    let daemon = start(
        s,
        DaemonOptions {
            extra_encode_delay: Some(Duration::from_millis(250)),
            ..DaemonOptions::default()
        },
    );
    let mut c = Client::connect(&socket(&daemon), "slow").unwrap();
    subscribe(&mut c, 1, SubscribeMode::Prompts, MaskEncoding::Bbox);
    let seqs: Vec<u64> = (0..4).map(|_| next_masks(&mut c).frame_seq).collect();
    let status = c.status(1).unwrap();
    // 50 fps in, ~3 fps through the encoder: most frames are replaced before it takes them ...
    assert!(
        status.frames_dropped * 2 > status.frames_captured,
        "{status:?}"
    );
    // ... results skip frames instead of queueing them ...
    assert!(seqs.windows(2).all(|w| w[1] >= w[0] + 5), "{seqs:?}");
    // ... and the encoder works on fresh frames: no backlog beyond one encode time of frames.
    let newest = status.newest_frame.unwrap();
    assert!(
        status.frames_captured <= newest + 1 + 25,
        "captured {} newest encoded {newest}",
        status.frames_captured
    );
    daemon.shutdown(Duration::from_secs(1));
}

#[test]
fn the_ring_answers_prompts_for_recent_frames() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for i in 0..6u64 {
        SyntheticSource::render(320, 240, i * 10)
            .save(images.join(format!("{i:02}.png")))
            .unwrap();
    }
    let s = settings(
        dir.path(),
        &format!("uri = \"file:{}\"\nfps = 4\nloop = false", images.display()),
        "[pipeline]\nring = 4",
    );
    let daemon = start(s, DaemonOptions::default());
    let mut c = Client::connect(&socket(&daemon), "ring").unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = c.status(1).unwrap();
        if s.frames_encoded + s.frames_dropped >= 6 || Instant::now() > until {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        status.frames_dropped, 0,
        "the file source is paced slower than the encoder"
    );
    assert_eq!(
        (status.oldest_frame, status.newest_frame),
        (Some(2), Some(5))
    );
    let ask = |c: &mut Client, seq: u64, id: u32| {
        c.request(PromptRequest {
            request_id: id,
            frame_seq: Some(seq),
            prompts: vec![point_prompt(100.0, 120.0)],
            encoding: MaskEncoding::Rle,
            multimask: true,
            frames: false,
        })
        .unwrap();
        c.recv(Some(Duration::from_secs(20))).unwrap()
    };
    // Frame N-2 is answered against that frame, with the same masks as the library gives.
    let ServerMessage::Masks(m) = ask(&mut c, 3, 10) else {
        panic!("expected masks")
    };
    assert_eq!((m.frame_seq, m.request_id, m.masks.len()), (3, Some(10), 3));
    let seg = crate::util::segmenter(Some(tinysam_edge::model::Precision::Fp32));
    let frame3 = image::open(images.join("03.png")).unwrap().to_rgb8();
    let emb = seg.embed(&frame3).unwrap();
    let prompt = point_prompt(100.0, 120.0).to_prompt();
    let direct = seg
        .segment(&emb, &[prompt], tinysam_edge::segmenter::MaskSelection::All)
        .unwrap()
        .remove(0)
        .unwrap();
    let areas: Vec<u64> = direct.iter().map(|r| r.area).collect();
    assert_eq!(m.masks.iter().map(|k| k.area).collect::<Vec<_>>(), areas);
    // Older than the ring and not yet captured: typed errors.
    let ServerMessage::Error(e) = ask(&mut c, 1, 11) else {
        panic!("expected an error")
    };
    assert_eq!((e.code, e.id), (ErrorCode::FrameExpired, Some(11)));
    let ServerMessage::Error(e) = ask(&mut c, 50, 12) else {
        panic!("expected an error")
    };
    assert_eq!(e.code, ErrorCode::FrameNotYet);
    // A prompt outside the frame is refused on its own.
    c.request(PromptRequest {
        request_id: 13,
        frame_seq: None,
        prompts: vec![point_prompt(5000.0, 1.0)],
        encoding: MaskEncoding::Rle,
        multimask: false,
        frames: false,
    })
    .unwrap();
    let ServerMessage::Error(e) = c.recv(Some(Duration::from_secs(20))).unwrap() else {
        panic!("expected an error")
    };
    assert_eq!((e.code, e.id), (ErrorCode::InvalidPrompt, Some(13)));
    // Beside good ones, bad prompts are refused one by one and the good ones answered (before:
    // one bad prompt refused the whole request).
    let reversed_box = WirePrompt {
        points: Vec::new(),
        bbox: Some([200.0, 100.0, 50.0, 150.0]),
    };
    c.request(PromptRequest {
        request_id: 14,
        frame_seq: None,
        prompts: vec![
            point_prompt(5000.0, 1.0),
            point_prompt(100.0, 120.0),
            reversed_box,
        ],
        encoding: MaskEncoding::Bbox,
        multimask: false,
        frames: false,
    })
    .unwrap();
    let ServerMessage::Masks(m) = c.recv(Some(Duration::from_secs(20))).unwrap() else {
        panic!("expected masks")
    };
    assert_eq!(m.request_id, Some(14));
    assert_eq!(m.masks.iter().map(|k| k.prompt).collect::<Vec<_>>(), [1]);
    let refused: Vec<(u32, ErrorCode)> = m.refused.iter().map(|r| (r.prompt, r.code)).collect();
    assert_eq!(
        refused,
        [(0, ErrorCode::InvalidPrompt), (2, ErrorCode::InvalidPrompt)]
    );
    assert!(m.refused[0].message.contains("outside"), "{:?}", m.refused);
    assert!(m.refused[1].message.contains("reversed"), "{:?}", m.refused);
    daemon.shutdown(Duration::from_secs(1));
}

/// A camera that fails: every 4th frame corrupt, the device vanishes after `frames_before_loss`
/// frames, and reopening fails `failed_reopens` times before the device comes back.
struct FakeCamera {
    opens: u32,
    failed_reopens: u32,
    frames_before_loss: u64,
}

struct FakeStream {
    seq: u64,
    lose_after: Option<u64>,
}

impl FrameSource for FakeStream {
    fn next_frame(&mut self) -> Result<Option<Frame>, CameraError> {
        std::thread::sleep(Duration::from_millis(40));
        let seq = self.seq;
        self.seq += 1;
        if self.lose_after.is_some_and(|n| seq >= n) {
            return Err(CameraError::Capture {
                device: "/dev/fake0".into(),
                source: std::io::Error::from_raw_os_error(19), // ENODEV
            });
        }
        if seq % 4 == 3 {
            return Err(CameraError::Corrupt {
                seq,
                source: PixelError::Jpeg("truncated".into()),
            });
        }
        Ok(Some(Frame {
            seq,
            captured_ns: monotonic_now_ns(),
            image: RgbImage::from_pixel(320, 240, image::Rgb([90, 120, (seq * 7 % 255) as u8])),
            convert: Duration::ZERO,
        }))
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            uri: "v4l2:/dev/fake0".into(),
            width: 320,
            height: 240,
            format: Some("mjpeg".into()),
            fps: 25.0,
        }
    }
}

impl CameraOpener for FakeCamera {
    fn open(&mut self) -> Result<Box<dyn FrameSource>, CameraError> {
        self.opens += 1;
        let first = self.opens == 1;
        if !first && self.opens <= 1 + self.failed_reopens {
            return Err(CameraError::Open {
                device: "/dev/fake0".into(),
                source: std::io::Error::from_raw_os_error(2), // ENOENT: unplugged
            });
        }
        Ok(Box::new(FakeStream {
            seq: 0,
            lose_after: first.then_some(self.frames_before_loss),
        }))
    }

    fn device(&self) -> String {
        "/dev/fake0".into()
    }
}

#[test]
fn reopening_keeps_sequence_numbers_increasing() {
    let stop = Arc::new(AtomicBool::new(false));
    let camera = FakeCamera {
        opens: 0,
        failed_reopens: 3,
        frames_before_loss: 6,
    };
    let mut src = Reopening::new(camera, stop)
        .with_backoff(Duration::from_millis(5), Duration::from_millis(20));
    let mut seqs = Vec::new();
    let mut corrupt = 0;
    while seqs.len() < 10 {
        match src.next_frame() {
            Ok(Some(f)) => seqs.push(f.seq),
            Err(e) if e.is_frame_error() => corrupt += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    assert_eq!(src.reopens(), 1);
    assert!(corrupt >= 2);
}

#[test]
fn a_lost_camera_is_reopened_and_subscribers_stay() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), "uri = \"v4l2:/dev/fake0\"", "");
    let stop = Arc::new(AtomicBool::new(false));
    let camera = FakeCamera {
        opens: 0,
        failed_reopens: 3,
        frames_before_loss: 12,
    };
    let source = Reopening::new(camera, stop.clone())
        .with_backoff(Duration::from_millis(20), Duration::from_millis(100));
    let daemon = Daemon::start_with_source(
        s,
        Box::new(source),
        stop,
        DaemonOptions {
            ignore_socket_activation: true,
            ..DaemonOptions::default()
        },
    )
    .unwrap();
    let mut c = Client::connect(&socket(&daemon), "survivor").unwrap();
    subscribe(&mut c, 1, SubscribeMode::Prompts, MaskEncoding::Bbox);
    let until = Instant::now() + Duration::from_secs(30);
    let mut seqs = Vec::new();
    loop {
        let m = next_masks(&mut c);
        seqs.push(m.frame_seq);
        let status = c.status(2).unwrap();
        if status.camera_reopens >= 1 && m.frame_seq > 14 {
            assert!(status.frames_corrupt >= 3, "{status:?}");
            break;
        }
        assert!(
            Instant::now() < until,
            "no frames after the camera came back: {seqs:?}"
        );
    }
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    daemon.shutdown(Duration::from_secs(1));
}

/// Issue 16's scheduler: a client that sends one request while another has eight waiting is
/// answered after at most a few of them (clients take turns), not after all eight (a single queue
/// served first in, first out); each client still gets its own answers in its own order. An
/// everything subscriber keeps the worker inside everything passes meanwhile, which now answer
/// requests between their chunks.
#[test]
fn a_flood_does_not_hold_back_another_clients_request() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), &synthetic_320x240("10"), "");
    let daemon = start(s, DaemonOptions::default());
    let path = socket(&daemon);
    let mut everything = Client::connect(&path, "everything").unwrap();
    subscribe(
        &mut everything,
        1,
        SubscribeMode::Everything,
        MaskEncoding::Bbox,
    );
    next_masks(&mut everything);
    let request = |id: u32| PromptRequest {
        request_id: id,
        frame_seq: None,
        prompts: vec![point_prompt(100.0 + id as f32, 120.0)],
        encoding: MaskEncoding::Bbox,
        multimask: false,
        frames: false,
    };
    let mut flood = Client::connect(&path, "flood").unwrap();
    let mut single = Client::connect(&path, "single").unwrap();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let flooder = std::thread::spawn(move || {
        for id in 0..8 {
            flood.request(request(id)).unwrap();
        }
        sent_tx.send(()).unwrap();
        (0..8)
            .map(
                |_| match flood.recv(Some(Duration::from_secs(60))).unwrap() {
                    ServerMessage::Masks(m) => (m.request_id, Instant::now()),
                    other => panic!("flood: expected masks, got {other:?}"),
                },
            )
            .collect::<Vec<_>>()
    });
    sent_rx.recv().unwrap();
    single.request(request(100)).unwrap();
    let answered = match single.recv(Some(Duration::from_secs(60))).unwrap() {
        ServerMessage::Masks(m) => {
            assert_eq!(m.request_id, Some(100));
            Instant::now()
        }
        other => panic!("single: expected masks, got {other:?}"),
    };
    let flood_answers = flooder.join().unwrap();
    let ids: Vec<Option<u32>> = flood_answers.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        (0..8).map(Some).collect::<Vec<_>>(),
        "in the flood's order"
    );
    let before = flood_answers.iter().filter(|(_, t)| *t < answered).count();
    assert!(
        before <= 3,
        "the single request waited for {before} of the flood's 8 requests"
    );
    daemon.shutdown(Duration::from_secs(1));
}

/// Poll `counter` until it reaches `at_least`; panics after `limit`.
fn wait_for_count(
    counter: &std::sync::atomic::AtomicU64,
    at_least: u64,
    limit: Duration,
    what: &str,
) {
    let deadline = Instant::now() + limit;
    while counter.load(std::sync::atomic::Ordering::Relaxed) < at_least {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Issue 16's priorities inside an everything pass of seconds: a `prompts` subscriber keeps
/// getting the masks of newer frames while the pass runs (before, it got nothing until the pass
/// ended), and a pass whose only subscriber has left stops instead of running to its end (before,
/// it kept the worker busy for the whole pass, ~40 s in the README's walk-through).
#[test]
fn standing_prompts_go_on_during_an_everything_pass_and_an_abandoned_pass_stops() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    // The flat 32x32 grid: 1 024 prompts, seconds per pass on the fixture model.
    let s = settings(
        dir.path(),
        &synthetic_320x240("10"),
        "[everything]\nstrategy = \"flat\"\npoints_per_side = 32\n",
    );
    let daemon = start(s, DaemonOptions::default());
    let path = socket(&daemon);
    let mut prompts = Client::connect(&path, "prompts").unwrap();
    subscribe(&mut prompts, 1, SubscribeMode::Prompts, MaskEncoding::Bbox);
    next_masks(&mut prompts);
    let mut everything = Client::connect(&path, "everything").unwrap();
    subscribe(
        &mut everything,
        2,
        SubscribeMode::Everything,
        MaskEncoding::Bbox,
    );
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(ServerMessage::Masks(m)) = prompts.recv(Some(Duration::from_millis(100)))
                {
                    seen.push((m.frame_seq, Instant::now()));
                }
            }
            seen
        })
    };
    let first = next_masks(&mut everything);
    let first_at = Instant::now();
    let counters = &daemon.metrics().counters;
    // The next pass begins on the newest frame at once; the subscriber leaves during it.
    wait_for_count(
        &counters.everything_started,
        2,
        Duration::from_secs(20),
        "a second pass",
    );
    drop(everything);
    wait_for_count(
        &counters.everything_stopped,
        1,
        Duration::from_secs(60),
        "the abandoned pass stopping",
    );
    let passes = daemon
        .metrics()
        .latencies()
        .into_iter()
        .find(|l| l.stage == "everything")
        .map_or(0, |l| l.count);
    assert_eq!(passes, 1, "only the first pass ran to its end");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.join().unwrap();
    daemon.shutdown(Duration::from_secs(1));
    let during: Vec<u64> = seen
        .iter()
        .filter(|(seq, at)| *seq > first.frame_seq && *at < first_at)
        .map(|(seq, _)| *seq)
        .collect();
    assert!(
        during.len() >= 2,
        "the prompts subscriber got {} newer frames during the everything pass on frame {}: {during:?}",
        during.len(),
        first.frame_seq
    );
}

/// Requests of different clients on the same frame are decoded together (one turn, one prompt
/// per inference thread): each client still gets exactly the masks its request gets alone,
/// whatever its prompts and mask selection, and in its own order.
#[test]
fn requests_decoded_together_get_the_masks_they_get_alone() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    // Two threads: a turn holds two prompts. A frame every 2 s: the one asked for stays in the
    // ring.
    let mut s = settings(dir.path(), &synthetic_320x240("0.5"), "");
    s.threads = 2;
    let daemon = start(s, DaemonOptions::default());
    let path = socket(&daemon);
    let request =
        |id: u32, frame_seq: Option<u64>, points: &[(f32, f32)], multimask: bool| PromptRequest {
            request_id: id,
            frame_seq,
            prompts: points.iter().map(|&(x, y)| point_prompt(x, y)).collect(),
            encoding: MaskEncoding::Rle,
            multimask,
            frames: false,
        };
    let answer = |c: &mut Client| match c.recv(Some(Duration::from_secs(60))).unwrap() {
        ServerMessage::Masks(m) => m,
        other => panic!("expected masks, got {other:?}"),
    };
    // The frame every request below asks for.
    let mut first = Client::connect(&path, "first").unwrap();
    subscribe(&mut first, 1, SubscribeMode::Prompts, MaskEncoding::Bbox);
    let frame = next_masks(&mut first).frame_seq;
    drop(first);
    let asks: Vec<(Vec<(f32, f32)>, bool)> = vec![
        (vec![(160.0, 120.0)], false),
        (vec![(40.0, 200.0), (300.0, 20.0)], false),
        (vec![(100.0, 100.0)], true),
        (vec![(250.0, 180.0)], false),
    ];
    let mut clients: Vec<Client> = (0..asks.len())
        .map(|i| Client::connect(&path, &format!("c{i}")).unwrap())
        .collect();
    // Alone: one request at a time.
    let alone: Vec<Masks> = clients
        .iter_mut()
        .zip(&asks)
        .enumerate()
        .map(|(i, (c, (points, multi)))| {
            c.request(request(i as u32 + 1, Some(frame), points, *multi))
                .unwrap();
            answer(c)
        })
        .collect();
    // Together: every client sends two requests at once, then all answers are read.
    for (i, (c, (points, multi))) in clients.iter_mut().zip(&asks).enumerate() {
        let id = 100 + 10 * i as u32;
        c.request(request(id, Some(frame), points, *multi)).unwrap();
        c.request(request(id + 1, Some(frame), points, *multi))
            .unwrap();
    }
    for (i, (c, want)) in clients.iter_mut().zip(&alone).enumerate() {
        for k in 0..2 {
            let got = answer(c);
            assert_eq!(
                got.request_id,
                Some(100 + 10 * i as u32 + k),
                "client {i}'s order"
            );
            assert_eq!(got.frame_seq, frame);
            assert_eq!(got.masks.len(), want.masks.len(), "client {i}");
            for (g, w) in got.masks.iter().zip(&want.masks) {
                assert_eq!((g.prompt, g.output), (w.prompt, w.output), "client {i}");
                assert!(
                    (g.score - w.score).abs() < 1e-4,
                    "client {i}: {g:?} vs {w:?}"
                );
                assert_eq!(g.rle, w.rle, "client {i}'s mask");
            }
        }
    }
    daemon.shutdown(Duration::from_secs(1));
}
