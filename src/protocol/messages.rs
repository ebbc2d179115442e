//! The message bodies: MessagePack maps with named fields, one struct per kind.

use serde::{Deserialize, Serialize};

use super::{ErrorCode, MaskEncoding, MAX_CLIENT_BODY, MAX_POINTS, MAX_PROMPTS, MAX_SUBSCRIPTIONS};

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
    /// Prompts as `tinysam sub` and `tinysam-ros2` take them on the command line: each box its
    /// own prompt, the points joining the first (or making the only prompt when there is no box).
    pub fn from_points_and_boxes(
        points: &[crate::prompt::PromptPoint],
        boxes: &[crate::prompt::BoxPrompt],
    ) -> Vec<WirePrompt> {
        use crate::prompt::PointLabel;
        let wire_points: Vec<(f32, f32, u8)> = points
            .iter()
            .map(|p| (p.x, p.y, u8::from(p.label == PointLabel::Foreground)))
            .collect();
        if boxes.is_empty() {
            return vec![WirePrompt {
                points: wire_points,
                bbox: None,
            }];
        }
        boxes
            .iter()
            .enumerate()
            .map(|(i, b)| WirePrompt {
                points: if i == 0 {
                    wire_points.clone()
                } else {
                    Vec::new()
                },
                bbox: Some([b.x0, b.y0, b.x1, b.y1]),
            })
            .collect()
    }

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
    /// Each result carries the frame it was computed on, as JPEG (`Masks::frame_jpeg`).
    #[serde(default)]
    pub frames: bool,
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
    /// The answer carries the frame it was computed on, as JPEG (`Masks::frame_jpeg`).
    #[serde(default)]
    pub frames: bool,
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
    /// The frame as JPEG, when the subscription or request asked for `frames`.
    #[serde(default, with = "serde_bytes")]
    pub frame_jpeg: Option<Vec<u8>>,
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
    /// Everything passes stopped early because all their subscribers had left (absent from
    /// older daemons: 0).
    #[serde(default)]
    pub everything_stopped: u64,
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
