//! The wire protocol between `tinysamd` and its subscribers (see `docs/protocol.md`).
//!
//! Every message is a 12-byte header — magic `TSAM`, protocol version (u16 LE), message kind
//! (u16 LE), body length (u32 LE) — followed by a MessagePack body (a map with named fields).
//! This module is pure: it parses and builds bytes and checks every size and count, and never
//! touches a socket. Parsing never panics and never allocates more than the capped body length.

use std::io::Read;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::postprocess::MaskEncoding;

/// First four bytes of every message.
pub const MAGIC: [u8; 4] = *b"TSAM";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes in a header.
pub const HEADER_LEN: usize = 12;
/// Largest body a client may send.
pub const MAX_CLIENT_BODY: usize = 64 * 1024;
/// Largest body the server sends (a client may refuse more).
pub const MAX_SERVER_BODY: usize = 64 << 20;
/// Most prompts in one subscription or request.
pub const MAX_PROMPTS: usize = 64;
/// Most points in one prompt.
pub const MAX_POINTS: usize = crate::prompt::MAX_POINTS;
/// The lowest non-zero `max_rate_hz` of a subscription: one result per 1 000 s.
pub const MIN_RATE_HZ: f32 = 0.001;
/// The highest `max_rate_hz` of a subscription.
pub const MAX_RATE_HZ: f32 = 1000.0;
/// Most subscriptions per client.
pub const MAX_SUBSCRIPTIONS: usize = 8;
/// Longest client name.
pub const MAX_NAME_LEN: usize = 64;

/// Message kinds (the header's u16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Client: first message, offers versions.
    Hello = 1,
    /// Client: start a subscription.
    Subscribe = 2,
    /// Client: end a subscription.
    Unsubscribe = 3,
    /// Client: prompts against one frame.
    PromptRequest = 4,
    /// Client: ask for metrics and model/source info.
    StatusRequest = 5,
    /// Client: leaving.
    Bye = 6,
    /// Server: handshake answer.
    Welcome = 64,
    /// Server: a subscription is active.
    Subscribed = 65,
    /// Server: masks for one frame.
    Masks = 66,
    /// Server: status report.
    Status = 67,
    /// Server: something the client sent (or asked for) failed.
    Error = 68,
}

impl Kind {
    /// The kind with this code.
    pub fn from_code(code: u16) -> Option<Kind> {
        use Kind::*;
        [
            Hello,
            Subscribe,
            Unsubscribe,
            PromptRequest,
            StatusRequest,
            Bye,
            Welcome,
            Subscribed,
            Masks,
            Status,
            Error,
        ]
        .into_iter()
        .find(|k| *k as u16 == code)
    }
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version of this message.
    pub version: u16,
    /// Raw kind code (unknown codes are reported, not rejected here).
    pub kind: u16,
    /// Body bytes that follow.
    pub length: u32,
}

impl Header {
    /// Parse and check 12 bytes against a body cap.
    pub fn parse(bytes: &[u8; HEADER_LEN], max_body: usize) -> Result<Header, ProtocolError> {
        if bytes[..4] != MAGIC {
            return Err(ProtocolError::BadMagic([
                bytes[0], bytes[1], bytes[2], bytes[3],
            ]));
        }
        let header = Header {
            version: u16::from_le_bytes([bytes[4], bytes[5]]),
            kind: u16::from_le_bytes([bytes[6], bytes[7]]),
            length: u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        };
        if header.version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version(header.version));
        }
        if header.length as usize > max_body {
            return Err(ProtocolError::TooLarge {
                length: header.length as usize,
                max: max_body,
            });
        }
        Ok(header)
    }

    /// The 12 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&self.kind.to_le_bytes());
        out[8..12].copy_from_slice(&self.length.to_le_bytes());
        out
    }
}

/// Why bytes are not a valid message. Each maps to an [`ErrorCode`] sent back to the client.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream does not start with `TSAM`: the connection is out of sync.
    #[error("bad magic {0:02x?}, expected \"TSAM\"")]
    BadMagic([u8; 4]),
    /// A header version other than ours.
    #[error("protocol version {0} is not supported (this server speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// A body longer than the cap.
    #[error("message body of {length} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        length: usize,
        /// The cap.
        max: usize,
    },
    /// A kind code we do not know, or one the other side must not send.
    #[error("unexpected message kind {0}")]
    UnknownKind(u16),
    /// The body is not the MessagePack map the kind requires.
    #[error("malformed {kind:?} body: {reason}")]
    Malformed {
        /// The kind.
        kind: Kind,
        /// The decoder's message.
        reason: String,
    },
    /// A well-formed message with values out of bounds.
    #[error("invalid {kind:?}: {reason}")]
    Invalid {
        /// The kind.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
    /// The connection closed in the middle of a message.
    #[error("connection closed mid-message")]
    Truncated,
    /// A socket error.
    #[error("socket error")]
    Io(#[source] std::io::Error),
}

impl ProtocolError {
    /// The code sent to the client for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::BadMagic(_) => ErrorCode::BadHeader,
            ProtocolError::Version(_) => ErrorCode::VersionUnsupported,
            ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtocolError::UnknownKind(_) => ErrorCode::UnknownKind,
            ProtocolError::Malformed { .. } => ErrorCode::Malformed,
            ProtocolError::Invalid { .. } => ErrorCode::InvalidRequest,
            ProtocolError::Truncated | ProtocolError::Io(_) => ErrorCode::Internal,
        }
    }

    /// True if the byte stream can no longer be trusted to be in sync (disconnect after replying).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ProtocolError::BadMagic(_)
                | ProtocolError::Version(_)
                | ProtocolError::TooLarge { .. }
                | ProtocolError::Truncated
                | ProtocolError::Io(_)
        )
    }
}

/// Error codes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Header magic wrong.
    BadHeader,
    /// No common protocol version.
    VersionUnsupported,
    /// Message over the size cap.
    TooLarge,
    /// Unknown or misdirected message kind.
    UnknownKind,
    /// Body not decodable.
    Malformed,
    /// Values out of bounds (counts, coordinates, rates).
    InvalidRequest,
    /// A message that is not allowed now (before the handshake, a second hello).
    OutOfOrder,
    /// A prompt the model cannot take (outside the frame, empty).
    InvalidPrompt,
    /// The requested frame left the embedding ring.
    FrameExpired,
    /// The requested frame has not been captured yet.
    FrameNotYet,
    /// No frame has been encoded yet.
    NoFrame,
    /// Too many subscriptions for this client, or too many clients.
    TooMany,
    /// The daemon's request queue is full; retry.
    Busy,
    /// Results do not fit in one message in the asked encoding.
    ResultTooLarge,
    /// Unknown subscription id.
    UnknownSubscription,
    /// The subscriber fell behind; results were dropped for it.
    Dropped,
    /// The daemon failed (model error); details in the message.
    Internal,
    /// The connection sent nothing and subscribed to nothing for the daemon's idle time; closed.
    Idle,
}

impl ErrorCode {
    /// The code as it is spelled on the wire (`invalid_prompt`), for people reading errors.
    pub fn wire_name(self) -> &'static str {
        match self {
            ErrorCode::BadHeader => "bad_header",
            ErrorCode::VersionUnsupported => "version_unsupported",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownKind => "unknown_kind",
            ErrorCode::Malformed => "malformed",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::OutOfOrder => "out_of_order",
            ErrorCode::InvalidPrompt => "invalid_prompt",
            ErrorCode::FrameExpired => "frame_expired",
            ErrorCode::FrameNotYet => "frame_not_yet",
            ErrorCode::NoFrame => "no_frame",
            ErrorCode::TooMany => "too_many",
            ErrorCode::Busy => "busy",
            ErrorCode::ResultTooLarge => "result_too_large",
            ErrorCode::UnknownSubscription => "unknown_subscription",
            ErrorCode::Dropped => "dropped",
            ErrorCode::Internal => "internal",
            ErrorCode::Idle => "idle",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.wire_name())
    }
}

/// What a subscription delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeMode {
    /// Segment-everything masks for every frame.
    Everything,
    /// The subscription's prompts, re-applied to every frame.
    Prompts,
    /// Nothing per frame; answers to prompt requests only (this subscription sets the encoding
    /// default and makes the client count as a subscriber).
    OnDemand,
}

/// One prompt: points `[x, y, label]` (label 1 foreground, 0 background) and/or a box
/// `[x0, y0, x1, y1]`, in frame pixels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WirePrompt {
    /// Points.
    pub points: Vec<(f32, f32, u8)>,
    /// Optional box.
    #[serde(rename = "box")]
    pub bbox: Option<[f32; 4]>,
}

impl WirePrompt {
    /// The library's prompt (bounds against the frame are checked when it is decoded).
    pub fn to_prompt(&self) -> crate::prompt::Prompt {
        use crate::prompt::{BoxPrompt, PointLabel, Prompt, PromptPoint};
        Prompt {
            points: self
                .points
                .iter()
                .map(|&(x, y, label)| PromptPoint {
                    x,
                    y,
                    label: if label == 0 {
                        PointLabel::Background
                    } else {
                        PointLabel::Foreground
                    },
                })
                .collect(),
            bbox: self
                .bbox
                .map(|[x0, y0, x1, y1]| BoxPrompt { x0, y0, x1, y1 }),
            mask_input: None,
        }
    }
}

/// Client → server: the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest version the client speaks.
    pub min_version: u16,
    /// Newest version the client speaks.
    pub max_version: u16,
    /// Free-form client name, for logs and status (≤ 64 bytes).
    #[serde(default)]
    pub client: String,
}

/// Server → client: the handshake answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both will use.
    pub version: u16,
    /// Server name and crate version.
    pub server: String,
    /// Client id given by the server.
    pub client_id: u64,
    /// Limits the server enforces.
    pub limits: Limits,
}

/// Limits announced in [`Welcome`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest client body.
    pub max_body: u32,
    /// Most prompts per subscription or request.
    pub max_prompts: u32,
    /// Most points per prompt.
    pub max_points: u32,
    /// Most subscriptions per client.
    pub max_subscriptions: u32,
}

impl Limits {
    /// This build's limits.
    pub fn current() -> Limits {
        Limits {
            max_body: MAX_CLIENT_BODY as u32,
            max_prompts: MAX_PROMPTS as u32,
            max_points: MAX_POINTS as u32,
            max_subscriptions: MAX_SUBSCRIPTIONS as u32,
        }
    }
}

/// Client → server: start a subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Client-chosen id, echoed in every result.
    pub id: u32,
    /// What to deliver.
    pub mode: SubscribeMode,
    /// Standing prompts (mode `prompts`).
    #[serde(default)]
    pub prompts: Vec<WirePrompt>,
    /// Mask encoding.
    #[serde(default)]
    pub encoding: MaskEncoding,
    /// Most results per second (0: every frame).
    #[serde(default)]
    pub max_rate_hz: f32,
    /// All three masks per prompt instead of the best.
    #[serde(default)]
    pub multimask: bool,
}

/// Server → client: a subscription is active.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribed {
    /// Its id.
    pub id: u32,
}

/// Client → server: end a subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribe {
    /// Its id.
    pub id: u32,
}

/// Client → server: prompts against one frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRequest {
    /// Client-chosen id, echoed in the answer.
    pub request_id: u32,
    /// Frame to use; `None`: the newest encoded frame.
    #[serde(default)]
    pub frame_seq: Option<u64>,
    /// The prompts.
    pub prompts: Vec<WirePrompt>,
    /// Mask encoding.
    #[serde(default)]
    pub encoding: MaskEncoding,
    /// All three masks per prompt instead of the best.
    #[serde(default)]
    pub multimask: bool,
}

/// Client → server: ask for a status report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// Client-chosen id, echoed.
    pub request_id: u32,
}

/// One mask in a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireMask {
    /// Index of the prompt it answers (everything mode: running index).
    pub prompt: u32,
    /// Which decoder output (0..3).
    pub output: u32,
    /// Predicted IoU.
    pub score: f32,
    /// Stability score.
    pub stability: f32,
    /// `[x, y, width, height]` in frame pixels (COCO); zeros for an empty mask.
    pub bbox: [u32; 4],
    /// Foreground pixels.
    pub area: u64,
    /// COCO compressed RLE (encoding `rle`).
    #[serde(default)]
    pub rle: Option<String>,
    /// Mono8 bitmap (encoding `bitmap`).
    #[serde(default, with = "serde_bytes")]
    pub bitmap: Option<Vec<u8>>,
    /// Polygons (encoding `polygon`).
    #[serde(default)]
    pub polygons: Option<Vec<Vec<i32>>>,
}

/// Server → client: masks for one frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Masks {
    /// Subscription this answers, if any.
    pub subscription: Option<u32>,
    /// Prompt request this answers, if any.
    pub request_id: Option<u32>,
    /// Frame sequence number.
    pub frame_seq: u64,
    /// Capture time, CLOCK_MONOTONIC ns.
    pub capture_ns: u64,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Results dropped for this client so far (it fell behind).
    pub dropped: u64,
    /// The masks.
    pub masks: Vec<WireMask>,
    /// Prompts of a prompt request that were refused (the others are answered in `masks`);
    /// a request whose every prompt is refused gets an `error invalid_prompt` instead.
    #[serde(default)]
    pub refused: Vec<RefusedPrompt>,
}

/// A prompt the model could not take for this frame, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusedPrompt {
    /// Index of the prompt in the request.
    pub prompt: u32,
    /// Always `invalid_prompt` today.
    pub code: ErrorCode,
    /// What is wrong with it.
    pub message: String,
}

/// Rolling latency of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageLatency {
    /// Stage name.
    pub stage: String,
    /// Samples in the window.
    pub count: u64,
    /// Median, ms.
    pub p50_ms: f32,
    /// 95th percentile, ms.
    pub p95_ms: f32,
}

/// The frame source, in a status report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// The source as configured (`synthetic`, `file:...`, `v4l2:...`).
    pub uri: String,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Camera pixel format, for V4L2 sources.
    pub format: Option<String>,
    /// Frame rate asked of the source (0: as fast as it goes).
    pub fps: f32,
}

/// Counters of one connected client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientCounters {
    /// Server-given id.
    pub client_id: u64,
    /// Its name from the hello.
    pub name: String,
    /// Active subscriptions.
    pub subscriptions: u32,
    /// Messages sent to it.
    pub sent: u64,
    /// Results dropped because it fell behind.
    pub dropped: u64,
    /// Results skipped by its rate cap.
    pub rate_limited: u64,
}

/// Server → client: metrics, model and source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Echoed request id.
    pub request_id: u32,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Source description.
    pub source: SourceStatus,
    /// Model directory, precisions and sizes.
    pub model: ModelInfo,
    /// Frames per second through the encoder (recent).
    pub fps: f32,
    /// Frames captured.
    pub frames_captured: u64,
    /// Frames encoded.
    pub frames_encoded: u64,
    /// Frames dropped before the encoder (latest-frame-wins).
    pub frames_dropped: u64,
    /// Frames encoded but skipped by the mask worker (it was busy).
    pub frames_skipped: u64,
    /// Corrupt camera frames dropped.
    pub frames_corrupt: u64,
    /// Camera reopens after failures.
    pub camera_reopens: u64,
    /// Newest frame in the embedding ring.
    pub newest_frame: Option<u64>,
    /// Oldest frame in the embedding ring.
    pub oldest_frame: Option<u64>,
    /// Per-stage latency.
    pub stages: Vec<StageLatency>,
    /// Connected clients.
    pub clients: Vec<ClientCounters>,
}

/// The model as the daemon runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model directory.
    pub dir: String,
    /// Manifest name.
    pub name: String,
    /// Encoder precision.
    pub encoder: String,
    /// Decoder precision.
    pub decoder: String,
    /// Encoder input side.
    pub image_size: u32,
    /// Inference threads.
    pub threads: u32,
}

/// Server → client: an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Request or subscription id it concerns, if any.
    pub id: Option<u32>,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
}

/// Any message a client sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// Handshake.
    Hello(Hello),
    /// Start a subscription.
    Subscribe(Subscribe),
    /// End one.
    Unsubscribe(Unsubscribe),
    /// Prompts against a frame.
    PromptRequest(PromptRequest),
    /// Status.
    StatusRequest(StatusRequest),
    /// Leaving.
    Bye,
}

/// Any message the server sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// Handshake answer.
    Welcome(Welcome),
    /// Subscription active.
    Subscribed(Subscribed),
    /// Masks.
    Masks(Masks),
    /// Status report.
    Status(Box<Status>),
    /// Error.
    Error(ErrorReply),
}

fn body<T: Serialize>(kind: Kind, value: &T) -> Vec<u8> {
    // Serializing our own plain structs into a Vec cannot fail.
    let body = rmp_serde::to_vec_named(value).unwrap_or_default();
    let header = Header {
        version: PROTOCOL_VERSION,
        kind: kind as u16,
        length: body.len() as u32,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode<T: DeserializeOwned>(kind: Kind, bytes: &[u8]) -> Result<T, ProtocolError> {
    rmp_serde::from_slice(bytes).map_err(|e| ProtocolError::Malformed {
        kind,
        reason: e.to_string(),
    })
}

fn invalid(kind: Kind, reason: String) -> ProtocolError {
    ProtocolError::Invalid { kind, reason }
}

fn check_prompts(kind: Kind, prompts: &[WirePrompt]) -> Result<(), ProtocolError> {
    if prompts.len() > MAX_PROMPTS {
        return Err(invalid(
            kind,
            format!("{} prompts, at most {MAX_PROMPTS}", prompts.len()),
        ));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.points.is_empty() && p.bbox.is_none() {
            return Err(invalid(kind, format!("prompt {i} has no point and no box")));
        }
        if let Err(e) = crate::prompt::check_point_count(p.points.len(), p.bbox.is_some()) {
            return Err(invalid(kind, format!("prompt {i}: {e}")));
        }
        let finite = p
            .points
            .iter()
            .all(|(x, y, _)| x.is_finite() && y.is_finite())
            && p.bbox.is_none_or(|b| b.iter().all(|v| v.is_finite()));
        if !finite {
            return Err(invalid(
                kind,
                format!("prompt {i} has a non-finite coordinate"),
            ));
        }
        if let Some((_, _, label)) = p.points.iter().find(|(_, _, l)| *l > 1) {
            return Err(invalid(
                kind,
                format!("prompt {i} has point label {label}; use 1 (foreground) or 0 (background)"),
            ));
        }
    }
    Ok(())
}

impl ClientMessage {
    /// Header plus body.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ClientMessage::Hello(m) => body(Kind::Hello, m),
            ClientMessage::Subscribe(m) => body(Kind::Subscribe, m),
            ClientMessage::Unsubscribe(m) => body(Kind::Unsubscribe, m),
            ClientMessage::PromptRequest(m) => body(Kind::PromptRequest, m),
            ClientMessage::StatusRequest(m) => body(Kind::StatusRequest, m),
            ClientMessage::Bye => body(Kind::Bye, &std::collections::BTreeMap::<u8, u8>::new()),
        }
    }

    /// Decode and bound-check the body of a message whose header said `kind`.
    pub fn decode(kind: u16, bytes: &[u8]) -> Result<ClientMessage, ProtocolError> {
        let k = Kind::from_code(kind).ok_or(ProtocolError::UnknownKind(kind))?;
        let msg = match k {
            Kind::Hello => {
                let m: Hello = decode(k, bytes)?;
                if m.client.len() > MAX_NAME_LEN {
                    return Err(invalid(k, format!("client name over {MAX_NAME_LEN} bytes")));
                }
                if m.min_version > m.max_version {
                    return Err(invalid(k, "min_version > max_version".into()));
                }
                ClientMessage::Hello(m)
            }
            Kind::Subscribe => {
                let m: Subscribe = decode(k, bytes)?;
                check_prompts(k, &m.prompts)?;
                if m.mode == SubscribeMode::Prompts && m.prompts.is_empty() {
                    return Err(invalid(k, "mode prompts needs at least one prompt".into()));
                }
                let rate = m.max_rate_hz;
                if !(rate == 0.0 || (MIN_RATE_HZ..=MAX_RATE_HZ).contains(&rate)) {
                    return Err(invalid(
                        k,
                        format!(
                            "max_rate_hz {rate} must be 0 (no limit) or \
                             {MIN_RATE_HZ}..={MAX_RATE_HZ}"
                        ),
                    ));
                }
                ClientMessage::Subscribe(m)
            }
            Kind::Unsubscribe => ClientMessage::Unsubscribe(decode(k, bytes)?),
            Kind::PromptRequest => {
                let m: PromptRequest = decode(k, bytes)?;
                check_prompts(k, &m.prompts)?;
                if m.prompts.is_empty() {
                    return Err(invalid(k, "no prompts".into()));
                }
                ClientMessage::PromptRequest(m)
            }
            Kind::StatusRequest => ClientMessage::StatusRequest(decode(k, bytes)?),
            Kind::Bye => ClientMessage::Bye,
            _ => return Err(ProtocolError::UnknownKind(kind)),
        };
        Ok(msg)
    }
}

impl ServerMessage {
    /// Header plus body.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ServerMessage::Welcome(m) => body(Kind::Welcome, m),
            ServerMessage::Subscribed(m) => body(Kind::Subscribed, m),
            ServerMessage::Masks(m) => body(Kind::Masks, m),
            ServerMessage::Status(m) => body(Kind::Status, m),
            ServerMessage::Error(m) => body(Kind::Error, m),
        }
    }

    /// Decode the body of a message whose header said `kind`.
    pub fn decode(kind: u16, bytes: &[u8]) -> Result<ServerMessage, ProtocolError> {
        let k = Kind::from_code(kind).ok_or(ProtocolError::UnknownKind(kind))?;
        Ok(match k {
            Kind::Welcome => ServerMessage::Welcome(decode(k, bytes)?),
            Kind::Subscribed => ServerMessage::Subscribed(decode(k, bytes)?),
            Kind::Masks => ServerMessage::Masks(decode(k, bytes)?),
            Kind::Status => ServerMessage::Status(Box::new(decode(k, bytes)?)),
            Kind::Error => ServerMessage::Error(decode(k, bytes)?),
            _ => return Err(ProtocolError::UnknownKind(kind)),
        })
    }

    /// An error reply.
    pub fn error(id: Option<u32>, code: ErrorCode, message: impl Into<String>) -> ServerMessage {
        ServerMessage::Error(ErrorReply {
            id,
            code,
            message: message.into(),
        })
    }
}

/// Read one message (header + body) from `reader`: `Ok(None)` on a clean end of stream before a
/// header. The body buffer is allocated only after the length passed the cap.
pub fn read_frame(
    reader: &mut impl Read,
    max_body: usize,
) -> Result<Option<(Header, Vec<u8>)>, ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    let header = Header::parse(&head, max_body)?;
    let mut body = vec![0u8; header.length as usize];
    reader.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })?;
    Ok(Some((header, body)))
}

/// Parse a whole client message from a byte slice (header + body): the fuzzing entry point.
pub fn parse_client_bytes(bytes: &[u8]) -> Result<ClientMessage, ProtocolError> {
    let mut cursor = std::io::Cursor::new(bytes);
    let (header, body) =
        read_frame(&mut cursor, MAX_CLIENT_BODY)?.ok_or(ProtocolError::Truncated)?;
    ClientMessage::decode(header.kind, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_print_as_on_the_wire() {
        for code in [
            ErrorCode::BadHeader,
            ErrorCode::VersionUnsupported,
            ErrorCode::TooLarge,
            ErrorCode::UnknownKind,
            ErrorCode::Malformed,
            ErrorCode::InvalidRequest,
            ErrorCode::OutOfOrder,
            ErrorCode::InvalidPrompt,
            ErrorCode::FrameExpired,
            ErrorCode::FrameNotYet,
            ErrorCode::NoFrame,
            ErrorCode::TooMany,
            ErrorCode::Busy,
            ErrorCode::ResultTooLarge,
            ErrorCode::UnknownSubscription,
            ErrorCode::Dropped,
            ErrorCode::Internal,
        ] {
            let wire = serde_json::to_value(code).expect("serialises");
            assert_eq!(wire.as_str(), Some(code.to_string().as_str()));
        }
    }
    use proptest::prelude::*;

    fn subscribe() -> ClientMessage {
        ClientMessage::Subscribe(Subscribe {
            id: 7,
            mode: SubscribeMode::Prompts,
            prompts: vec![WirePrompt {
                points: vec![(10.0, 20.0, 1), (5.0, 5.0, 0)],
                bbox: Some([1.0, 2.0, 30.0, 40.0]),
            }],
            encoding: MaskEncoding::Polygon,
            max_rate_hz: 5.0,
            multimask: true,
        })
    }

    #[test]
    fn round_trips() {
        let messages = [
            ClientMessage::Hello(Hello {
                min_version: 1,
                max_version: 3,
                client: "ros2-node".into(),
            }),
            subscribe(),
            ClientMessage::Unsubscribe(Unsubscribe { id: 7 }),
            ClientMessage::PromptRequest(PromptRequest {
                request_id: 3,
                frame_seq: Some(41),
                prompts: vec![WirePrompt {
                    points: vec![(1.0, 1.0, 1)],
                    bbox: None,
                }],
                encoding: MaskEncoding::Bitmap,
                multimask: false,
            }),
            ClientMessage::StatusRequest(StatusRequest { request_id: 9 }),
            ClientMessage::Bye,
        ];
        for m in messages {
            assert_eq!(parse_client_bytes(&m.encode()).unwrap(), m);
        }
        let masks = ServerMessage::Masks(Masks {
            subscription: Some(1),
            request_id: None,
            frame_seq: 5,
            capture_ns: 123,
            width: 4,
            height: 2,
            dropped: 0,
            masks: vec![WireMask {
                prompt: 0,
                output: 2,
                score: 0.9,
                stability: 0.95,
                bbox: [0, 0, 2, 2],
                area: 4,
                rle: None,
                bitmap: Some(vec![255, 255, 0, 0, 255, 255, 0, 0]),
                polygons: None,
            }],
            refused: vec![RefusedPrompt {
                prompt: 1,
                code: ErrorCode::InvalidPrompt,
                message: "outside".into(),
            }],
        });
        let bytes = masks.encode();
        let header =
            Header::parse(bytes[..HEADER_LEN].try_into().unwrap(), MAX_SERVER_BODY).unwrap();
        assert_eq!(
            ServerMessage::decode(header.kind, &bytes[HEADER_LEN..]).unwrap(),
            masks
        );
    }

    #[test]
    fn every_malformed_class_has_its_error() {
        let good = subscribe().encode();
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert_eq!(
            parse_client_bytes(&bad_magic).unwrap_err().code(),
            ErrorCode::BadHeader
        );
        let mut bad_version = good.clone();
        bad_version[4] = 9;
        assert_eq!(
            parse_client_bytes(&bad_version).unwrap_err().code(),
            ErrorCode::VersionUnsupported
        );
        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse_client_bytes(&huge).unwrap_err().code(),
            ErrorCode::TooLarge
        );
        let mut unknown = good.clone();
        unknown[6] = 99;
        assert_eq!(
            parse_client_bytes(&unknown).unwrap_err().code(),
            ErrorCode::UnknownKind
        );
        let mut server_kind = good.clone();
        server_kind[6] = Kind::Masks as u8;
        assert_eq!(
            parse_client_bytes(&server_kind).unwrap_err().code(),
            ErrorCode::UnknownKind
        );
        assert!(matches!(
            parse_client_bytes(&good[..good.len() - 1]),
            Err(ProtocolError::Truncated)
        ));
        assert!(matches!(
            parse_client_bytes(&good[..5]),
            Err(ProtocolError::Truncated)
        ));
        let mut garbage = good[..HEADER_LEN].to_vec();
        garbage[8..12].copy_from_slice(&3u32.to_le_bytes());
        garbage.extend_from_slice(&[0xc1, 0xc1, 0xc1]);
        assert_eq!(
            parse_client_bytes(&garbage).unwrap_err().code(),
            ErrorCode::Malformed
        );
        let too_many = ClientMessage::Subscribe(Subscribe {
            id: 1,
            mode: SubscribeMode::Prompts,
            prompts: vec![
                WirePrompt {
                    points: vec![(1.0, 1.0, 1)],
                    bbox: None
                };
                MAX_PROMPTS + 1
            ],
            encoding: MaskEncoding::Rle,
            max_rate_hz: 0.0,
            multimask: false,
        });
        assert_eq!(
            parse_client_bytes(&too_many.encode()).unwrap_err().code(),
            ErrorCode::InvalidRequest
        );
        let nan = ClientMessage::PromptRequest(PromptRequest {
            request_id: 1,
            frame_seq: None,
            prompts: vec![WirePrompt {
                points: vec![(f32::NAN, 1.0, 1)],
                bbox: None,
            }],
            encoding: MaskEncoding::Rle,
            multimask: false,
        });
        assert_eq!(
            parse_client_bytes(&nan.encode()).unwrap_err().code(),
            ErrorCode::InvalidRequest
        );
    }

    /// A subscription's rate is 0 (no limit) or 0.001..=1000 Hz: before, 1e-20 passed and its
    /// interval overflowed a `Duration` in the reader thread (a panic that leaked the client).
    #[test]
    fn subscription_rates_outside_the_range_are_refused() {
        let subscribe = |max_rate_hz| {
            ClientMessage::Subscribe(Subscribe {
                id: 1,
                mode: SubscribeMode::Everything,
                prompts: Vec::new(),
                encoding: MaskEncoding::Rle,
                max_rate_hz,
                multimask: false,
            })
            .encode()
        };
        for good in [0.0, MIN_RATE_HZ, 1.0, MAX_RATE_HZ] {
            assert!(parse_client_bytes(&subscribe(good)).is_ok(), "{good}");
        }
        for bad in [1e-20, 5e-4, -1.0, 1000.5, f32::NAN, f32::INFINITY, -0.0001] {
            let err = parse_client_bytes(&subscribe(bad)).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidRequest, "{bad}");
            assert!(err.to_string().contains("max_rate_hz"), "{err}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_client_bytes(&bytes);
        }

        #[test]
        fn valid_header_with_random_body_never_panics(
            kind in 0u16..80,
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = Header { version: PROTOCOL_VERSION, kind, length: body.len() as u32 }
                .to_bytes()
                .to_vec();
            bytes.extend_from_slice(&body);
            let _ = parse_client_bytes(&bytes);
        }

        #[test]
        fn prompts_round_trip(
            points in proptest::collection::vec((0f32..4000.0, 0f32..4000.0, 0u8..2), 1..MAX_POINTS),
            id in any::<u32>(),
        ) {
            let m = ClientMessage::PromptRequest(PromptRequest {
                request_id: id,
                frame_seq: Some(u64::from(id)),
                prompts: vec![WirePrompt { points, bbox: None }],
                encoding: MaskEncoding::Rle,
                multimask: false,
            });
            prop_assert_eq!(parse_client_bytes(&m.encode()).unwrap(), m);
        }
    }
}
