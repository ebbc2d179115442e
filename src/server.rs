//! The Unix-socket server: binds (or inherits from systemd) the socket, accepts up to a cap of
//! clients, and runs two threads per client — a reader that parses and answers requests, and a
//! writer that drains the client's own bounded queue. A client that stops reading is disconnected
//! after the stall timeout; it never blocks the pipeline or other clients.
//!
//! Nothing polls for shutdown: [`Server::stop`] wakes the accept loop through a socket pair it
//! waits on beside the listener, and shuts every client socket down for reading, so that each
//! reader's blocked `read` returns at once; a client's writer wakes when the client's slot is
//! released. Reads time out only at the handshake and idle deadlines.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::hub::{
    ClientStats, Failure, FailureKind, Hub, MaskBatch, Outbound, Subscription, SubscriptionKind,
};
use crate::metrics::{Metrics, Stage};
use crate::postprocess::polygon::mask_polygons;
use crate::postprocess::{MaskEncoding, MaskResult};
use crate::protocol::{
    self, ClientMessage, ErrorCode, Limits, Masks, ProtocolError, RefusedPrompt, ServerMessage,
    Status, Subscribed, Welcome, WireMask, MAX_CLIENT_BODY, MAX_SERVER_BODY, PROTOCOL_VERSION,
};
use crate::scheduler::{ClientId, PromptJob, Refusal, RequestQueue};

/// The socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another live daemon answers on the path.
    #[error("socket {0} is in use by a running daemon")]
    InUse(PathBuf),
    /// The path exists and is not a socket: refuse to delete it.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Binding, chmod or chown failed.
    #[error("setting up socket {path}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The configured group does not exist.
    #[error("socket group {0:?} does not exist")]
    NoSuchGroup(String),
}

/// How long a new client has to send its hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bind `path`, replacing a stale socket file (one no daemon answers on), then set its mode and
/// group.
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<UnixListener, ServerError> {
    let io_err = |source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_path_buf()));
        }
        log::info!("removing stale socket {}", path.display());
        std::fs::remove_file(path).map_err(io_err)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    // Bind and set up under a private name, then link it to `path`: the path appears only once
    // the socket listens with its final mode and group, so a client that waits for the file
    // never meets a refused connection or a socket its group cannot open yet. `link` fails if
    // `path` appeared meanwhile (another daemon won the race) instead of replacing it.
    let staging = staging_path(path);
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(io_err)?;
    let staged = StagedSocket(&staging);
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    if let Some(name) = group {
        let gid = nix::unistd::Group::from_name(name)
            .map_err(|e| io_err(std::io::Error::from(e)))?
            .ok_or_else(|| ServerError::NoSuchGroup(name.to_string()))?
            .gid;
        std::os::unix::fs::chown(&staging, None, Some(gid.as_raw())).map_err(io_err)?;
    }
    match std::fs::hard_link(&staging, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ServerError::InUse(path.to_path_buf()))
        }
        Err(e) => return Err(io_err(e)),
    }
    drop(staged);
    Ok(listener)
}

/// The private name a socket is bound under before it appears at `path`: a hidden sibling named
/// after the process (two daemons never share it), kept short (`.tinysamd-PID`) because socket
/// paths are limited to 107 bytes.
fn staging_path(path: &Path) -> PathBuf {
    path.with_file_name(format!(".tinysamd-{}", std::process::id()))
}

/// Removes the staging name when binding ends, whether it succeeded or not.
struct StagedSocket<'a>(&'a Path);

impl Drop for StagedSocket<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// The listening socket passed by systemd socket activation (`LISTEN_FDS`), if any.
pub fn listener_from_systemd() -> Option<UnixListener> {
    let fds = sd_notify::listen_fds().ok()?;
    let fd = fds.into_iter().next()?;
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID matched, checked by
    // listen_fds) and nothing else in the process owns or closes it.
    #[allow(unsafe_code)]
    let listener = unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    Some(listener)
}

/// What the server needs from the rest of the daemon.
#[derive(Clone)]
pub struct ServerContext {
    /// Subscribers.
    pub hub: Arc<Hub>,
    /// Prompt requests waiting for the mask worker.
    pub requests: Arc<RequestQueue>,
    /// Where publish latencies go.
    pub metrics: Arc<Metrics>,
    /// Builds a status report.
    pub status: Arc<dyn Fn(u32) -> Status + Send + Sync>,
    /// Most clients at once.
    pub max_clients: usize,
    /// Outbound queue per client.
    pub queue: usize,
    /// Disconnect a client that accepts nothing for this long.
    pub stall_timeout: Duration,
    /// Close a connection that sends nothing for this long and has no standing subscription
    /// (one that reads its results is alive); `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Set when the daemon stops ([`Server::stop`] sets it too).
    pub stop: Arc<AtomicBool>,
}

/// What [`Server::stop`] must reach: the accept loop's wake-up socket and the open client
/// sockets (clones of them), under one lock with the stopped state, so that a client that
/// connects while the server stops is shut down as it registers.
struct Shutter {
    state: Mutex<ShutterState>,
    /// Written to (shut down) to wake the accept loop.
    wake: UnixStream,
}

#[derive(Default)]
struct ShutterState {
    stopped: bool,
    clients: HashMap<ClientId, UnixStream>,
}

impl Shutter {
    /// A shutter that wakes the accept loop by shutting `wake` down (the loop polls its peer).
    fn new(wake: UnixStream) -> Arc<Shutter> {
        Arc::new(Shutter {
            state: Mutex::new(ShutterState::default()),
            wake,
        })
    }

    fn locked(&self) -> MutexGuard<'_, ShutterState> {
        // The map stays consistent if a holder panicked: every change is one insert or remove.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keep a handle on a client's socket until [`Shutter::forget`]; shut it down at once if
    /// the server has stopped.
    fn watch(&self, id: ClientId, stream: &UnixStream) -> std::io::Result<()> {
        let handle = stream.try_clone()?;
        let mut state = self.locked();
        if state.stopped {
            let _ = handle.shutdown(Shutdown::Read);
        }
        state.clients.insert(id, handle);
        Ok(())
    }

    fn forget(&self, id: ClientId) {
        self.locked().clients.remove(&id);
    }

    /// Wake every blocked reader and the accept loop; later clients are shut down as they
    /// register.
    fn stop(&self) {
        let mut state = self.locked();
        state.stopped = true;
        for stream in state.clients.values() {
            // A reader blocked in `read` gets end-of-file; replies can still be written.
            let _ = stream.shutdown(Shutdown::Read);
        }
        drop(state);
        let _ = self.wake.shutdown(Shutdown::Both);
    }
}

/// The accept loop and client threads.
pub struct Server {
    accept: JoinHandle<()>,
    clients: Arc<AtomicUsize>,
    shutter: Arc<Shutter>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Start accepting on `listener`.
    pub fn start(listener: UnixListener, ctx: ServerContext) -> std::io::Result<Server> {
        // Non-blocking: a connection that was ready when `poll` said so may be gone by the time
        // `accept` runs, and the loop must not block there.
        listener.set_nonblocking(true)?;
        let (wake, woken) = UnixStream::pair()?;
        let shutter = Shutter::new(wake);
        let clients = Arc::new(AtomicUsize::new(0));
        let stop = ctx.stop.clone();
        let accept = {
            let (count, shutter) = (clients.clone(), shutter.clone());
            std::thread::Builder::new()
                .name("accept".into())
                .spawn(move || accept_loop(listener, woken, ctx, count, shutter))?
        };
        Ok(Server {
            accept,
            clients,
            shutter,
            stop,
        })
    }

    /// Stop accepting and end every client's connection: blocked threads wake at once (see the
    /// module docs). [`Server::join`] waits for them.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.shutter.stop();
    }

    /// Clients connected now.
    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Wait up to `deadline` for the accept loop and the client threads to end (after
    /// [`Server::stop`]).
    pub fn join(self, deadline: Duration) {
        let until = Instant::now() + deadline;
        while (!self.accept.is_finished() || self.clients.load(Ordering::Relaxed) > 0)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.accept.is_finished() {
            let _ = self.accept.join();
        }
    }
}

/// Whether `listener` has a connection waiting (false: `woken` says stop, or poll failed).
fn connection_waiting(listener: &UnixListener, woken: &UnixStream) -> bool {
    let ready = PollFlags::POLLIN;
    let mut fds = [
        PollFd::new(listener.as_fd(), ready),
        PollFd::new(woken.as_fd(), ready),
    ];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::warn!("waiting for clients: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
                return false;
            }
        }
    }
    let any = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
    !any(&fds[1]) && any(&fds[0])
}

fn accept_loop(
    listener: UnixListener,
    woken: UnixStream,
    ctx: ServerContext,
    count: Arc<AtomicUsize>,
    shutter: Arc<Shutter>,
) {
    while !ctx.stop.load(Ordering::Relaxed) {
        if !connection_waiting(&listener, &woken) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nonblocking(false) {
                    log::warn!("client socket: {e}");
                    continue;
                }
                if count.load(Ordering::Relaxed) >= ctx.max_clients {
                    log::warn!("refusing a client: {} already connected", ctx.max_clients);
                    let msg = ServerMessage::error(
                        None,
                        ErrorCode::TooMany,
                        format!("server has its maximum of {} clients", ctx.max_clients),
                    );
                    let mut stream = stream;
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
                    let _ = stream.write_all(&msg.encode());
                    continue;
                }
                if let Err(e) = spawn_client(stream, ctx.clone(), count.clone(), &shutter) {
                    log::error!("starting client threads: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("accept: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// One client's hold on the server: its place under the connection cap, its registration in
/// the hub and its writer thread, all given back when the guard drops — on every way out of the
/// reader thread, a panic included, and when starting the client fails half-way.
struct ClientSlot {
    id: ClientId,
    hub: Arc<Hub>,
    /// Its prompt requests still waiting are dropped with it.
    requests: Arc<RequestQueue>,
    count: Arc<AtomicUsize>,
    closing: Arc<AtomicBool>,
    /// Its socket, for [`Server::stop`]; forgotten with the slot.
    shutter: Arc<Shutter>,
    /// Never sends: dropping it tells the writer the client is gone.
    closed: Option<Sender<()>>,
    writer: Option<JoinHandle<()>>,
}

impl ClientSlot {
    /// Take a place under the cap and register with the hub.
    /// Returns the slot, the client's counters and the receiver that closes with the slot.
    fn claim(
        ctx: &ServerContext,
        count: Arc<AtomicUsize>,
        shutter: &Arc<Shutter>,
        tx: Sender<Outbound>,
        answers: Sender<Outbound>,
    ) -> (ClientSlot, Arc<ClientStats>, Receiver<()>) {
        count.fetch_add(1, Ordering::Relaxed);
        let (id, stats) = ctx.hub.register(String::new(), tx, answers);
        let (closed, on_close) = bounded(0);
        let slot = ClientSlot {
            id,
            hub: ctx.hub.clone(),
            requests: ctx.requests.clone(),
            count,
            closing: Arc::new(AtomicBool::new(false)),
            shutter: shutter.clone(),
            closed: Some(closed),
            writer: None,
        };
        (slot, stats, on_close)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
        self.shutter.forget(self.id);
        // Its result queue closes with the hub's sender (the reader's went first).
        self.hub.unregister(self.id);
        let cancelled = self.requests.cancel(self.id);
        if cancelled > 0 {
            log::debug!("client {}: {cancelled} waiting requests dropped", self.id);
        }
        // The writer ends when it has written the item in hand (or at its stall timeout).
        drop(self.closed.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
        log::info!("client {} disconnected", self.id);
    }
}

fn spawn_client(
    stream: UnixStream,
    ctx: ServerContext,
    count: Arc<AtomicUsize>,
    shutter: &Arc<Shutter>,
) -> std::io::Result<()> {
    let (tx, rx) = bounded(ctx.queue.max(1));
    let (answers_tx, answers) = crossbeam_channel::unbounded();
    let (mut slot, stats, closed) = ClientSlot::claim(&ctx, count, shutter, tx.clone(), answers_tx);
    let id = slot.id;
    log::info!("client {id} connected");
    shutter.watch(id, &stream)?;
    let write_half = stream.try_clone()?;
    write_half.set_write_timeout(Some(ctx.stall_timeout))?;
    let closing = slot.closing.clone();
    slot.writer = Some({
        let (closing, stats) = (closing.clone(), stats.clone());
        let metrics = ctx.metrics.clone();
        std::thread::Builder::new()
            .name(format!("client-{id}-tx"))
            .spawn(move || {
                let queues = Queues {
                    answers,
                    rx,
                    closed,
                };
                write_loop(id, write_half, queues, &stats, &metrics, &closing)
            })?
    });
    // On failure the closure, and with it the slot, is dropped here: the client is released.
    std::thread::Builder::new()
        .name(format!("client-{id}-rx"))
        .spawn(move || {
            // Declared first, dropped last: the reader (and its sender) go before the slot
            // waits for the writer.
            let _slot = slot;
            let mut reader = ClientReader {
                id,
                stream,
                ctx,
                tx,
                closing,
                hello: false,
            };
            reader.run();
        })?;
    Ok(())
}

/// Reads until `deadline` (blocking without one); gives up on `stop`, `closing` or past the
/// deadline. [`Server::stop`] and a writer that gives up shut the socket down, which ends a
/// blocked read with end-of-file.
struct PatientReader<'a> {
    stream: &'a UnixStream,
    stop: &'a AtomicBool,
    closing: &'a AtomicBool,
    /// When to give up waiting, and what to say then.
    deadline: Option<(Instant, &'static str)>,
    /// Asked at the deadline: whether the client is alive all the same (it subscribed and
    /// reads); then the wait goes on for the given time.
    keep_alive: Option<(&'a dyn Fn() -> bool, Duration)>,
}

impl Read for PatientReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.stop.load(Ordering::Relaxed) || self.closing.load(Ordering::Relaxed) {
                // Not `Interrupted`: `read_frame` and `read_exact` retry on that, so a reader of
                // a closing connection would spin on this branch forever.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "closing",
                ));
            }
            let mut timeout = None;
            if let Some((deadline, why)) = self.deadline {
                let now = Instant::now();
                if now >= deadline {
                    match self.keep_alive {
                        Some((alive, extend)) if alive() => {
                            self.deadline = Some((now + extend, why));
                        }
                        _ => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why)),
                    }
                }
                // At least a millisecond: a zero timeout means none at all.
                timeout = self.deadline.map(|(deadline, _)| {
                    deadline
                        .saturating_duration_since(now)
                        .max(Duration::from_millis(1))
                });
            }
            self.stream.set_read_timeout(timeout)?;
            match (&mut &*self.stream).read(buf) {
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

struct ClientReader {
    id: ClientId,
    stream: UnixStream,
    ctx: ServerContext,
    tx: Sender<Outbound>,
    closing: Arc<AtomicBool>,
    hello: bool,
}

impl ClientReader {
    /// Replies bypass the drop-on-full rule: they are answers the client waits for. If even they
    /// cannot be queued for the stall timeout, the client is gone.
    fn reply(&self, msg: ServerMessage) -> bool {
        match self
            .tx
            .send_timeout(Outbound::Encoded(msg.encode()), self.ctx.stall_timeout)
        {
            Ok(()) => true,
            Err(_) => {
                log::warn!("client {}: reply queue stalled, disconnecting", self.id);
                false
            }
        }
    }

    fn run(&mut self) {
        loop {
            let now = Instant::now();
            let (hub, id) = (&self.ctx.hub, self.id);
            let subscribed = move || hub.has_standing_subscription(id);
            // Before hello: the handshake timeout. After: the idle timeout, if any, which a
            // client with a standing subscription outlives.
            let (deadline, keep_alive, timeout_code) = match (self.hello, self.ctx.idle_timeout) {
                (false, _) => (
                    Some((
                        now + HANDSHAKE_TIMEOUT,
                        "no hello within the handshake timeout",
                    )),
                    None,
                    ErrorCode::OutOfOrder,
                ),
                (true, Some(idle)) => (
                    Some((now + idle, "nothing received within the idle timeout")),
                    Some((&subscribed as &dyn Fn() -> bool, idle)),
                    ErrorCode::Idle,
                ),
                (true, None) => (None, None, ErrorCode::Idle),
            };
            let mut reader = PatientReader {
                stream: &self.stream,
                stop: &self.ctx.stop,
                closing: &self.closing,
                deadline,
                keep_alive,
            };
            let (header, body) = match protocol::read_frame(&mut reader, MAX_CLIENT_BODY) {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(ProtocolError::Io(e)) => {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        log::warn!("client {}: {e}", self.id);
                        self.reply(ServerMessage::error(None, timeout_code, e.to_string()));
                    }
                    return;
                }
                Err(e) => {
                    log::warn!("client {}: {e}", self.id);
                    self.reply(ServerMessage::error(None, e.code(), e.to_string()));
                    return;
                }
            };
            let message = match ClientMessage::decode(header.kind, &body) {
                Ok(m) => m,
                Err(e) => {
                    log::debug!("client {}: {e}", self.id);
                    if !self.reply(ServerMessage::error(None, e.code(), e.to_string())) {
                        return;
                    }
                    if !self.hello {
                        return;
                    }
                    continue;
                }
            };
            if !self.handle(message) {
                return;
            }
        }
    }

    /// Answer one message; false to disconnect.
    fn handle(&mut self, message: ClientMessage) -> bool {
        let hub = &self.ctx.hub;
        match message {
            ClientMessage::Hello(h) => {
                if self.hello {
                    return self.reply(ServerMessage::error(
                        None,
                        ErrorCode::OutOfOrder,
                        "hello was already received",
                    ));
                }
                if !(h.min_version..=h.max_version).contains(&PROTOCOL_VERSION) {
                    self.reply(ServerMessage::error(
                        None,
                        ErrorCode::VersionUnsupported,
                        format!(
                            "client speaks {}..={}, server speaks {PROTOCOL_VERSION}",
                            h.min_version, h.max_version
                        ),
                    ));
                    return false;
                }
                self.hello = true;
                log::info!("client {} is {:?}", self.id, h.client);
                hub.rename(self.id, h.client);
                self.reply(ServerMessage::Welcome(Welcome {
                    version: PROTOCOL_VERSION,
                    server: format!("tinysamd {}", env!("CARGO_PKG_VERSION")),
                    client_id: self.id,
                    limits: Limits::current(),
                }))
            }
            _ if !self.hello => {
                self.reply(ServerMessage::error(
                    None,
                    ErrorCode::OutOfOrder,
                    "the first message must be hello",
                ));
                false
            }
            ClientMessage::Subscribe(s) => {
                let prompts = s.prompts.iter().map(|p| p.to_prompt()).collect();
                let sub = Subscription::new(
                    s.id,
                    subscription_kind(s.mode),
                    prompts,
                    s.encoding,
                    s.multimask,
                    s.frames,
                    s.max_rate_hz,
                );
                let mode = s.mode;
                match hub.subscribe(self.id, sub) {
                    Ok(()) => {
                        log::debug!("client {} subscribed {} ({mode:?})", self.id, s.id);
                        self.reply(ServerMessage::Subscribed(Subscribed { id: s.id }))
                    }
                    Err(failure) => self.reply(failure_message(failure)),
                }
            }
            ClientMessage::Unsubscribe(u) => {
                if hub.unsubscribe(self.id, u.id) {
                    self.reply(ServerMessage::Subscribed(Subscribed { id: u.id }))
                } else {
                    self.reply(ServerMessage::error(
                        Some(u.id),
                        ErrorCode::UnknownSubscription,
                        format!("no subscription {}", u.id),
                    ))
                }
            }
            ClientMessage::PromptRequest(r) => {
                let job = PromptJob {
                    client: self.id,
                    request_id: r.request_id,
                    frame_seq: r.frame_seq,
                    prompts: r.prompts.iter().map(|p| p.to_prompt()).collect(),
                    encoding: r.encoding,
                    multimask: r.multimask,
                    frames: r.frames,
                };
                match self.ctx.requests.submit(job) {
                    Ok(()) => true,
                    Err(why @ (Refusal::ClientFull(_) | Refusal::Full(_))) => self.reply(
                        ServerMessage::error(Some(r.request_id), ErrorCode::Busy, why.to_string()),
                    ),
                    Err(why @ Refusal::Closed) => self.reply(ServerMessage::error(
                        Some(r.request_id),
                        ErrorCode::Internal,
                        why.to_string(),
                    )),
                }
            }
            ClientMessage::StatusRequest(r) => {
                let status = (self.ctx.status)(r.request_id);
                self.reply(ServerMessage::Status(Box::new(status)))
            }
            ClientMessage::Bye => false,
        }
    }
}

/// Polygon simplification tolerance, pixels.
pub const POLYGON_TOLERANCE: f64 = 1.0;

/// One mask for prompt `prompt`, in `encoding`, as it goes on the wire.
fn wire_mask(prompt: u32, mask: &MaskResult, encoding: MaskEncoding) -> WireMask {
    let mut out = WireMask {
        prompt,
        output: u32::try_from(mask.index).unwrap_or(u32::MAX),
        score: mask.score,
        stability: mask.stability,
        bbox: mask.bbox,
        area: mask.area,
        rle: None,
        bitmap: None,
        polygons: None,
    };
    match encoding {
        MaskEncoding::Rle => out.rle = Some(mask.mask.to_rle().to_compressed()),
        MaskEncoding::Bitmap => {
            out.bitmap = Some(
                mask.mask
                    .data
                    .iter()
                    .map(|&v| if v > 0 { 255 } else { 0 })
                    .collect(),
            )
        }
        MaskEncoding::Polygon => out.polygons = Some(mask_polygons(&mask.mask, POLYGON_TOLERANCE)),
        MaskEncoding::Bbox => {}
    }
    out
}

fn encode_masks(batch: &MaskBatch, dropped: u64) -> ServerMessage {
    let frame_jpeg = batch.picture.as_ref().and_then(|p| match p.jpeg() {
        Ok(jpeg) => Some(jpeg.to_vec()),
        Err(e) => {
            log::error!("frame {}: {e}; the result goes without it", batch.frame.seq);
            None
        }
    });
    let masks: Vec<WireMask> = batch
        .masks
        .iter()
        .map(|(prompt, m)| wire_mask(*prompt, m, batch.encoding))
        .collect();
    ServerMessage::Masks(Masks {
        subscription: batch.subscription,
        request_id: batch.request_id,
        frame_seq: batch.frame.seq,
        capture_ns: batch.frame.captured_ns,
        width: batch.frame.width,
        height: batch.frame.height,
        dropped,
        masks,
        refused: batch
            .refused
            .iter()
            .map(|(prompt, message)| RefusedPrompt {
                prompt: *prompt,
                code: ErrorCode::InvalidPrompt,
                message: message.clone(),
            })
            .collect(),
        frame_jpeg,
    })
}

/// What a client's writer sends: answers to its prompt requests first (never dropped), then
/// everything else (subscription results, dropped when full; replies of the reader thread).
struct Queues {
    answers: Receiver<Outbound>,
    rx: Receiver<Outbound>,
    /// Disconnects when the client's slot is released.
    closed: Receiver<()>,
}

impl Queues {
    /// The next item, an answer if one waits; once the client is gone, what is still queued,
    /// then `None` (a client that sends a request and closes its end still gets the answer).
    fn next(&self) -> Option<Outbound> {
        if let Ok(item) = self.answers.try_recv() {
            return Some(item);
        }
        crossbeam_channel::select! {
            // A closed answer queue (the client is being removed) leaves the other one.
            recv(self.answers) -> item => item.ok().or_else(|| self.next_result()),
            recv(self.rx) -> item => item.ok(),
            recv(self.closed) -> _ => self.rx.try_recv().ok(),
        }
    }

    /// The next subscription result; once the client is gone, one still queued or `None`.
    fn next_result(&self) -> Option<Outbound> {
        crossbeam_channel::select! {
            recv(self.rx) -> item => item.ok(),
            recv(self.closed) -> _ => self.rx.try_recv().ok(),
        }
    }
}

fn write_loop(
    id: ClientId,
    mut stream: UnixStream,
    queues: Queues,
    stats: &ClientStats,
    metrics: &Metrics,
    closing: &AtomicBool,
) {
    while let Some(item) = queues.next() {
        let started = Instant::now();
        let (bytes, batch) = match item {
            Outbound::Masks(batch) => {
                let msg = encode_masks(&batch, stats.dropped.load(Ordering::Relaxed));
                (msg.encode(), Some(batch))
            }
            Outbound::Failed(failure) => (failure_message(failure).encode(), None),
            Outbound::Encoded(bytes) => (bytes, None),
        };
        let bytes = if bytes.len() - protocol::HEADER_LEN > MAX_SERVER_BODY {
            let id = batch.as_ref().and_then(|b| b.subscription.or(b.request_id));
            ServerMessage::error(
                id,
                ErrorCode::ResultTooLarge,
                format!(
                    "result of {} bytes exceeds {MAX_SERVER_BODY}; use rle or polygon encoding",
                    bytes.len()
                ),
            )
            .encode()
        } else {
            bytes
        };
        if let Err(e) = stream.write_all(&bytes) {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                log::warn!("client {id} stalled (no read within the stall timeout); disconnecting");
            } else {
                log::debug!("client {id}: write failed: {e}");
            }
            closing.store(true, Ordering::Relaxed);
            let _ = stream.shutdown(Shutdown::Both);
            break;
        }
        stats.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = batch {
            record_publish(metrics, &b, started);
        }
    }
    closing.store(true, Ordering::Relaxed);
}

fn record_publish(metrics: &Metrics, batch: &MaskBatch, started: Instant) {
    metrics.record(Stage::Publish, started.elapsed());
    let now = crate::monotonic_now_ns();
    if batch.subscription.is_some() && now > batch.frame.captured_ns {
        metrics.record(
            Stage::EndToEnd,
            Duration::from_nanos(now - batch.frame.captured_ns),
        );
    }
}

/// The wire error for a failure of the pipeline's.
fn failure_message(failure: Failure) -> ServerMessage {
    let code = match failure.kind {
        FailureKind::NoFrame => ErrorCode::NoFrame,
        FailureKind::FrameExpired => ErrorCode::FrameExpired,
        FailureKind::FrameNotYet => ErrorCode::FrameNotYet,
        FailureKind::InvalidPrompt => ErrorCode::InvalidPrompt,
        FailureKind::TooManySubscriptions => ErrorCode::TooMany,
        FailureKind::Internal => ErrorCode::Internal,
    };
    ServerMessage::error(failure.id, code, failure.message)
}

/// The pipeline's kind of subscription for a wire mode.
fn subscription_kind(mode: protocol::SubscribeMode) -> SubscriptionKind {
    match mode {
        protocol::SubscribeMode::Everything => SubscriptionKind::Everything,
        protocol::SubscribeMode::Prompts => SubscriptionKind::Prompts,
        protocol::SubscribeMode::OnDemand => SubscriptionKind::OnDemand,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket appears listening with its mode, no staging name is left, and a second bind
    /// on a live socket is refused without touching it.
    #[test]
    fn bind_appears_ready_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("d.sock");
        let listener = bind(&path, 0o640, None).expect("bound");
        let mode = std::fs::metadata(&path)
            .expect("socket file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("listing")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["d.sock"]);
        let _client = UnixStream::connect(&path).expect("connects through the linked name");
        assert!(listener.accept().is_ok());
        assert!(matches!(
            bind(&path, 0o640, None),
            Err(ServerError::InUse(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path()).expect("listing").count(), 1);
    }

    /// What the writer puts on the wire for `answers` and `results` queued before it starts,
    /// read until it ends. With `released`, the client's slot is gone while its queues stay
    /// open; without, the slot stays and the queues close once written.
    fn written(answers: &[&str], results: &[&str], released: bool) -> Vec<String> {
        let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let (tx, rx) = bounded(results.len().max(1));
        let (answers_tx, answers_rx) = crossbeam_channel::unbounded();
        let message = |text: &str| {
            Outbound::Encoded(ServerMessage::error(None, ErrorCode::Busy, text).encode())
        };
        for text in results {
            tx.send(message(text)).expect("queued");
        }
        for text in answers {
            answers_tx.send(message(text)).expect("queued");
        }
        let (slot, closed) = bounded::<()>(0);
        // Held until the writer has ended: the queues' senders when the slot is released (it
        // must end because the client is gone), else the slot (it must end because the queues
        // closed).
        let held = if released {
            drop(slot);
            (None, Some((tx, answers_tx)))
        } else {
            drop((tx, answers_tx));
            (Some(slot), None)
        };
        std::thread::spawn(move || {
            let (stats, metrics) = (ClientStats::default(), Metrics::new());
            let queues = Queues {
                answers: answers_rx,
                rx,
                closed,
            };
            write_loop(1, ours, queues, &stats, &metrics, &AtomicBool::new(false));
            drop(held);
        });
        let mut texts = Vec::new();
        while let Some((header, body)) =
            protocol::read_frame(&mut theirs, MAX_SERVER_BODY).expect("reads")
        {
            let msg = ServerMessage::decode(header.kind, &body).expect("decodes");
            texts.push(format!("{msg:?}"));
        }
        texts
    }

    /// With the result queue full, an answer to a request is the next message on the wire.
    #[test]
    fn answers_go_before_queued_results() {
        let texts = written(
            &["the answer"],
            &["result 0", "result 1", "result 2"],
            false,
        );
        assert!(texts[0].contains("the answer"), "{texts:?}");
        assert!(texts[3].contains("result 2"), "{texts:?}");
    }

    /// A client that is gone (its slot released) still gets what was queued for it: the reply to
    /// a request it sent just before closing its end, say.
    #[test]
    fn a_released_client_gets_what_was_queued() {
        // Several results: a writer that stopped at the release would keep one of them only by
        // luck (its wait picks among ready queues at random).
        let results: Vec<String> = (0..5).map(|i| format!("result {i}")).collect();
        let results: Vec<&str> = results.iter().map(String::as_str).collect();
        let texts = written(&["an answer"], &results, true);
        assert_eq!(texts.len(), 6, "{texts:?}");
        assert!(texts[0].contains("an answer"), "{texts:?}");
        assert!(texts[5].contains("result 4"), "{texts:?}");
    }

    /// A reader whose connection is marked closing must give up, not retry forever: the bug was
    /// an `Interrupted` error, which `read_frame` (and `read_exact`) retry, so the reader thread
    /// spun on one core for the rest of the process.
    #[test]
    fn reader_of_a_closing_connection_returns_instead_of_spinning() {
        let (ours, _theirs) = UnixStream::pair().expect("socket pair");
        let done = read_in_background(ours, true);
        let read = done
            .recv_timeout(Duration::from_secs(10))
            .expect("read_frame returned");
        match read.err() {
            Some(ProtocolError::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted)
            }
            other => panic!("expected an I/O error for a closing connection, got {other:?}"),
        }
    }

    type Frame = Result<Option<(protocol::Header, Vec<u8>)>, ProtocolError>;

    /// One `read_frame` on `stream` through a reader without a deadline, on a thread of its
    /// own; its result comes on the channel.
    fn read_in_background(stream: UnixStream, closing: bool) -> Receiver<Frame> {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let (stop, closing) = (AtomicBool::new(false), AtomicBool::new(closing));
            let mut reader = PatientReader {
                stream: &stream,
                stop: &stop,
                closing: &closing,
                deadline: None,
                keep_alive: None,
            };
            let _ = done_tx.send(protocol::read_frame(&mut reader, MAX_CLIENT_BODY));
        });
        done_rx
    }

    /// A reader blocked without any timeout (a client that said hello and has no idle limit)
    /// returns as soon as the server stops: stopping shuts its socket down, nothing polls.
    #[test]
    fn stopping_wakes_a_reader_blocked_without_a_timeout() {
        // The accept loop's end of the wake-up pair stays open: the wake-up is a shutdown.
        let (wake, _woken) = UnixStream::pair().expect("socket pair");
        let shutter = Shutter::new(wake);
        let (ours, _theirs) = UnixStream::pair().expect("socket pair");
        shutter.watch(7, &ours).expect("watched");
        let done = read_in_background(ours, false);
        assert!(
            done.recv_timeout(Duration::from_millis(300)).is_err(),
            "the reader returned before the stop"
        );
        shutter.stop();
        let read = done
            .recv_timeout(Duration::from_secs(10))
            .expect("the reader returned after the stop");
        assert!(matches!(read, Ok(None)), "the reader saw end-of-file");
        // A client that registers after the stop is shut down as it registers.
        let (late, _peer) = UnixStream::pair().expect("socket pair");
        shutter.watch(8, &late).expect("watched");
        let mut byte = [0u8; 1];
        assert_eq!((&late).read(&mut byte).expect("reads"), 0);
        shutter.forget(7);
        shutter.forget(8);
        assert!(shutter.locked().clients.is_empty());
    }

    /// The accept loop's wait ends when the server stops, and says that no client is waiting.
    #[test]
    fn stopping_wakes_the_accept_loop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = UnixListener::bind(dir.path().join("s.sock")).expect("bound");
        let (wake, woken) = UnixStream::pair().expect("socket pair");
        let shutter = Shutter::new(wake);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = done_tx.send(connection_waiting(&listener, &woken));
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err());
        shutter.stop();
        let waiting = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the wait ended after the stop");
        assert!(!waiting);
    }
}
