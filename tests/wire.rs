//! The socket protocol against a live in-process daemon: every malformed-message class gets its
//! typed error (and the connection survives where the stream is still in sync), limits hold, and
//! eight mixed subscribers keep their latency while a ninth stops reading.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use tinysam_edge::client::{Client, ClientError};
use tinysam_edge::daemon::DaemonOptions;
use tinysam_edge::monotonic_now_ns;
use tinysam_edge::protocol::{
    ClientMessage, ErrorCode, Header, Hello, MaskEncoding, PromptRequest, ServerMessage, Subscribe,
    SubscribeMode, WirePrompt, MAX_CLIENT_BODY, MAX_SUBSCRIPTIONS, PROTOCOL_VERSION,
};

use crate::daemon::{next_masks, serial, settings, start, subscribe, synthetic_320x240};

fn expect_error(c: &mut Client, code: ErrorCode) {
    match c.recv(Some(Duration::from_secs(10))) {
        Ok(ServerMessage::Error(e)) => assert_eq!(e.code, code, "{e:?}"),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

fn expect_closed(c: &mut Client) {
    match c.recv(Some(Duration::from_secs(10))) {
        Err(ClientError::Closed) | Err(ClientError::Protocol(_)) | Err(ClientError::Io(..)) => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
}

/// Send `bytes` as the first thing on a new connection; the error code of the reply.
fn first_reply(path: &std::path::Path, bytes: &[u8]) -> (ErrorCode, UnixStream) {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(bytes).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (h, body) = tinysam_edge::protocol::read_frame(&mut s, 1 << 20)
        .unwrap()
        .expect("a reply");
    match ServerMessage::decode(h.kind, &body).unwrap() {
        ServerMessage::Error(e) => (e.code, s),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Wait (up to 10 s) until the daemon counts at most `n` clients. A client the server closed,
/// or one that hung up, gives its place under the cap back when its own threads have ended: a
/// moment later, and much later on a loaded machine. A test that needs the place must wait.
fn wait_for_clients(count: impl Fn() -> usize, n: usize) {
    let until = Instant::now() + Duration::from_secs(10);
    while count() > n {
        assert!(
            Instant::now() < until,
            "{} clients still connected, expected at most {n}",
            count()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn raw(bytes: &[u8], kind: u16) -> Vec<u8> {
    let mut out = Header {
        version: PROTOCOL_VERSION,
        kind,
        length: bytes.len() as u32,
    }
    .to_bytes()
    .to_vec();
    out.extend_from_slice(bytes);
    out
}

#[test]
fn malformed_messages_get_typed_errors() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), &synthetic_320x240("4"), "");
    s.max_clients = 4;
    let daemon = start(s, DaemonOptions::default());
    let path = daemon.settings.socket_path.clone();

    // A bystander that must be unaffected by everything below.
    let mut bystander = Client::connect(&path, "bystander").unwrap();

    // Malformed body: error, connection stays.
    let mut c = Client::connect(&path, "bad-body").unwrap();
    c.send_raw(&raw(&[0xc1, 0xc1], 2)).unwrap();
    expect_error(&mut c, ErrorCode::Malformed);
    // Out-of-bounds values: error, connection stays.
    c.send(&ClientMessage::Subscribe(Subscribe {
        id: 1,
        mode: SubscribeMode::Prompts,
        prompts: vec![WirePrompt {
            points: vec![(1.0, 1.0, 1); 40],
            bbox: None,
        }],
        encoding: MaskEncoding::Rle,
        max_rate_hz: 0.0,
        multimask: false,
        frames: false,
    }))
    .unwrap();
    expect_error(&mut c, ErrorCode::InvalidRequest);
    // Unknown kind and a server-only kind: error, connection stays.
    c.send_raw(&raw(&[0x80], 77)).unwrap();
    expect_error(&mut c, ErrorCode::UnknownKind);
    c.send_raw(&raw(&[0x80], 66)).unwrap();
    expect_error(&mut c, ErrorCode::UnknownKind);
    // A second hello is out of order.
    c.send(&ClientMessage::Hello(Hello {
        min_version: 1,
        max_version: 1,
        client: "again".into(),
    }))
    .unwrap();
    expect_error(&mut c, ErrorCode::OutOfOrder);
    // Too many subscriptions.
    for id in 0..MAX_SUBSCRIPTIONS as u32 {
        subscribe(&mut c, id, SubscribeMode::OnDemand, MaskEncoding::Bbox);
    }
    c.send(&ClientMessage::Subscribe(Subscribe {
        id: 99,
        mode: SubscribeMode::OnDemand,
        prompts: vec![],
        encoding: MaskEncoding::Bbox,
        max_rate_hz: 0.0,
        multimask: false,
        frames: false,
    }))
    .unwrap();
    expect_error(&mut c, ErrorCode::TooMany);
    // Unknown subscription.
    c.send(&ClientMessage::Unsubscribe(
        tinysam_edge::protocol::Unsubscribe { id: 12345 },
    ))
    .unwrap();
    expect_error(&mut c, ErrorCode::UnknownSubscription);
    // Still usable.
    assert!(c.status(3).is_ok());

    // Oversized: error, then disconnected (the body was never read).
    let mut c = Client::connect(&path, "huge").unwrap();
    let mut huge = raw(&[], 2);
    huge[8..12].copy_from_slice(&((MAX_CLIENT_BODY as u32) + 1).to_le_bytes());
    c.send_raw(&huge).unwrap();
    expect_error(&mut c, ErrorCode::TooLarge);
    expect_closed(&mut c);
    // Each probe below takes a place under the cap (4) until the server has closed it.
    let clients = || daemon.client_count();
    wait_for_clients(clients, 2);

    // Bad magic: error, then disconnected.
    let (reply, mut s) = first_reply(&path, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(reply, ErrorCode::BadHeader);
    let mut buf = [0u8; 1];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "closed after a bad header"
    );
    wait_for_clients(clients, 2);

    // Anything before hello: out of order, disconnected.
    let status =
        ClientMessage::StatusRequest(tinysam_edge::protocol::StatusRequest { request_id: 1 });
    assert_eq!(
        first_reply(&path, &status.encode()).0,
        ErrorCode::OutOfOrder
    );
    wait_for_clients(clients, 2);

    // No common version: refused.
    let future = ClientMessage::Hello(Hello {
        min_version: 2,
        max_version: 5,
        client: "future".into(),
    });
    assert_eq!(
        first_reply(&path, &future.encode()).0,
        ErrorCode::VersionUnsupported
    );

    // Client cap (4): the bystander, the first bad client, and two more fit; the next is refused.
    wait_for_clients(clients, 2);
    let _third = Client::connect(&path, "third").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _fourth = Client::connect(&path, "fourth");
    let refused = (0..3).any(|_| {
        matches!(
            Client::connect(&path, "one-too-many"),
            Err(ClientError::Server(ref e)) if e.code == ErrorCode::TooMany
        )
    });
    assert!(refused, "the client cap was not enforced");

    // The bystander saw none of it.
    subscribe(&mut bystander, 1, SubscribeMode::Prompts, MaskEncoding::Rle);
    let m = next_masks(&mut bystander);
    assert_eq!(m.masks.len(), 2);
    daemon.shutdown(Duration::from_secs(1));
}

/// Per-result latency (capture to receipt) of one subscriber, median over `n` results.
fn median_latency_ms(c: &mut Client, n: usize) -> f64 {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let m = next_masks(c);
            (monotonic_now_ns() - m.capture_ns) as f64 / 1e6
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn eight_mixed_subscribers_and_a_stalled_one() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let fps = 4.0;
    let s = settings(
        dir.path(),
        &synthetic_320x240(&fps.to_string()),
        "[everything]\npoints_per_side = 4\npred_iou_thresh = 0.0\nstability_thresh = 0.0",
    );
    let daemon = start(s, DaemonOptions::default());
    let path = daemon.settings.socket_path.clone();
    let modes = [
        (SubscribeMode::Prompts, MaskEncoding::Rle),
        (SubscribeMode::Prompts, MaskEncoding::Bitmap),
        (SubscribeMode::Prompts, MaskEncoding::Polygon),
        (SubscribeMode::Prompts, MaskEncoding::Bbox),
        (SubscribeMode::Everything, MaskEncoding::Rle),
        (SubscribeMode::Everything, MaskEncoding::Bbox),
        (SubscribeMode::Prompts, MaskEncoding::Rle),
        (SubscribeMode::OnDemand, MaskEncoding::Rle),
    ];
    let mut clients: Vec<Client> = modes
        .iter()
        .enumerate()
        .map(|(i, (mode, enc))| {
            let mut c = Client::connect(&path, &format!("sub{i}")).unwrap();
            subscribe(&mut c, i as u32, *mode, *enc);
            c
        })
        .collect();
    // Every subscriber gets correct, in-order results in its encoding.
    for (i, c) in clients.iter_mut().enumerate().take(7) {
        let a = next_masks(c);
        let b = next_masks(c);
        assert!(b.frame_seq > a.frame_seq, "subscriber {i} out of order");
        assert_eq!(a.subscription, Some(i as u32));
        let (mode, enc) = modes[i];
        assert!(!a.masks.is_empty(), "subscriber {i} got no masks");
        if mode == SubscribeMode::Prompts {
            assert_eq!(a.masks.len(), 2);
        }
        for m in &a.masks {
            match enc {
                MaskEncoding::Rle => assert!(m.rle.is_some()),
                MaskEncoding::Bitmap => {
                    assert_eq!(m.bitmap.as_ref().map(Vec::len), Some(320 * 240))
                }
                MaskEncoding::Polygon => assert!(m.polygons.is_some()),
                MaskEncoding::Bbox => {
                    assert!(m.rle.is_none() && m.bitmap.is_none() && m.polygons.is_none())
                }
            }
        }
    }
    // The on-demand client asks for the newest frame.
    let od = &mut clients[7];
    od.request(PromptRequest {
        request_id: 5,
        frame_seq: None,
        prompts: vec![WirePrompt {
            points: vec![(10.0, 10.0, 1)],
            bbox: Some([0.0, 0.0, 100.0, 100.0]),
        }],
        encoding: MaskEncoding::Rle,
        multimask: false,
        frames: false,
    })
    .unwrap();
    let m = next_masks(od);
    assert_eq!((m.request_id, m.masks.len()), (Some(5), 1));

    // Baseline latency of subscriber 0, then again with a subscriber that never reads.
    let before = median_latency_ms(&mut clients[0], 6);
    let mut staller = UnixStream::connect(&path).unwrap();
    staller
        .write_all(
            &ClientMessage::Hello(Hello {
                min_version: 1,
                max_version: 1,
                client: "staller".into(),
            })
            .encode(),
        )
        .unwrap();
    staller
        .write_all(
            &ClientMessage::Subscribe(Subscribe {
                id: 1,
                mode: SubscribeMode::Prompts,
                prompts: vec![WirePrompt {
                    points: vec![(160.0, 120.0, 1)],
                    bbox: None,
                }],
                encoding: MaskEncoding::Bitmap,
                max_rate_hz: 0.0,
                multimask: true,
                frames: false,
            })
            .encode(),
        )
        .unwrap();
    let during = median_latency_ms(&mut clients[0], 6);
    let frame_ms = 1000.0 / fps;
    assert!(
        during - before <= frame_ms,
        "a stalled subscriber slowed another from {before:.1} to {during:.1} ms"
    );
    // Everyone else is still served, and the staller is eventually dropped.
    for c in clients.iter_mut().take(7) {
        next_masks(c);
    }
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let status = clients[7].status(9).unwrap();
        if !status.clients.iter().any(|c| c.name == "staller") {
            break;
        }
        assert!(
            Instant::now() < until,
            "staller never disconnected: {:?}",
            status.clients
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "multi-subscriber latency p50: {before:.1} ms alone, {during:.1} ms with a stalled peer"
    );
    daemon.shutdown(Duration::from_secs(1));
}

/// Clients that misbehave and leave give their slots back: 3 times the client cap connect, ask
/// for a rate below the protocol's floor (before: a panic in the reader thread that kept the
/// slot and a ghost subscriber), and go; then a new client is served. A client that says hello
/// and then nothing is closed with `idle` after `socket.idle_timeout_s`, while a standing
/// subscriber that reads its results stays, however silent.
#[test]
fn slots_come_back_and_idle_connections_close() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(
        dir.path(),
        "uri = \"synthetic\"\nwidth = 160\nheight = 120\nfps = 5",
        "idle_timeout_s = 1\n",
    );
    s.max_clients = 4;
    let daemon = start(s, DaemonOptions::default());
    let path = daemon.settings.socket_path.clone();

    for i in 0..12 {
        // The earlier clients hung up; their places come back once the server has seen it.
        wait_for_clients(|| daemon.client_count(), 3);
        let mut c = Client::connect(&path, &format!("tiny-rate-{i}")).unwrap();
        c.send(&ClientMessage::Subscribe(Subscribe {
            id: 1,
            mode: SubscribeMode::Everything,
            prompts: Vec::new(),
            encoding: MaskEncoding::Bbox,
            max_rate_hz: 1e-20,
            multimask: false,
            frames: false,
        }))
        .unwrap();
        expect_error(&mut c, ErrorCode::InvalidRequest);
    }
    // Slots are given back as the readers notice the hang-ups.
    let until = Instant::now() + Duration::from_secs(10);
    let mut fresh = loop {
        match Client::connect(&path, "fresh") {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < until, "no slot came back: {e:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert!(fresh.status(1).is_ok());

    // Silent after hello: closed with `idle` after about a second.
    let mut silent = Client::connect(&path, "silent").unwrap();
    let mut subscriber = Client::connect(&path, "subscriber").unwrap();
    subscribe(
        &mut subscriber,
        1,
        SubscribeMode::Prompts,
        MaskEncoding::Bbox,
    );
    let started = Instant::now();
    expect_error(&mut silent, ErrorCode::Idle);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    expect_closed(&mut silent);
    // The subscriber has sent nothing since, for well over the idle time, and still gets masks.
    std::thread::sleep(Duration::from_millis(1500));
    let until = Instant::now() + Duration::from_secs(20);
    let mut masks = 0;
    while masks < 3 {
        assert!(
            Instant::now() < until,
            "the subscriber stopped getting masks"
        );
        match subscriber.recv(Some(Duration::from_secs(10))) {
            Ok(ServerMessage::Masks(_)) => masks += 1,
            Ok(_) => {}
            Err(e) => panic!("the subscriber was dropped: {e:?}"),
        }
    }
    drop(fresh);
}
