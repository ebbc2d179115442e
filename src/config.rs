//! The daemon's configuration: a TOML file, then command-line overrides, validated once at start
//! with errors that name the key and the bad value.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::everything::{EverythingParams, Strategy};
use crate::pixel::PixelFormat;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key, line and column).
        message: String,
    },
    /// A key has a value out of range or malformed.
    #[error("config key `{key}` = {value}: {reason}")]
    Invalid {
        /// Dotted key, e.g. `source.fps`.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What is expected.
        reason: String,
    },
}

/// The error for `key` = `value`, with what is expected.
fn invalid(key: &'static str, value: String, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        value,
        reason: reason.into(),
    }
}

/// `value` parsed by its type's `FromStr`, or the error naming `key` and the choices.
fn choice<T: std::str::FromStr>(
    key: &'static str,
    value: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(key, format!("{value:?}"), expected))
}

/// Where frames come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    /// The moving test pattern.
    Synthetic,
    /// A still image or a directory of images.
    File(PathBuf),
    /// A V4L2 device node.
    V4l2(PathBuf),
}

impl SourceKind {
    /// Parse `synthetic`, `file:PATH` or `v4l2:/dev/videoN`.
    pub fn parse(uri: &str) -> Result<SourceKind, ConfigError> {
        let invalid = |reason: &str| ConfigError::Invalid {
            key: "source.uri",
            value: format!("{uri:?}"),
            reason: reason.into(),
        };
        if uri == "synthetic" {
            return Ok(SourceKind::Synthetic);
        }
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| invalid("expected synthetic, file:PATH or v4l2:/dev/videoN"))?;
        if rest.is_empty() {
            return Err(invalid("the path after the scheme is empty"));
        }
        match scheme {
            "file" => Ok(SourceKind::File(PathBuf::from(rest))),
            "v4l2" => Ok(SourceKind::V4l2(PathBuf::from(rest))),
            _ => Err(invalid("unknown scheme; use synthetic, file: or v4l2:")),
        }
    }
}

/// `[source]`: the camera or its stand-in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `synthetic`, `file:PATH` or `v4l2:/dev/videoN`.
    pub uri: String,
    /// Frame width asked of the camera or the synthetic source.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Capture rate cap, frames per second (0: as fast as the source goes).
    pub fps: f32,
    /// V4L2 pixel format: `auto`, `mjpeg`, `yuyv`, `nv12`, `rgb24`.
    pub format: String,
    /// File sources: start again after the last image.
    #[serde(rename = "loop")]
    pub looped: bool,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            uri: "synthetic".into(),
            width: 640,
            height: 480,
            fps: 15.0,
            format: "auto".into(),
            looped: true,
        }
    }
}

/// `[model]`: what to run and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Model directory (manifest.json + ONNX files); empty: the default search path.
    pub dir: PathBuf,
    /// Encoder precision: `auto` (the manifest's), `int8`, `fp32`.
    pub encoder: String,
    /// Decoder precision: `auto`, `int8`, `fp32`. A model directory without an INT8 decoder
    /// file loads `int8` as its FP32 split decoder quantized at load.
    pub decoder: String,
    /// Inference threads; 0: all cores.
    pub threads: usize,
    /// INT8 matrix products: `auto` (ours, fastest kernel of this CPU), `tract` (tract's own
    /// kernels), or one of ours by name: `portable`, `avx2`, `vnni`, `sdot`.
    pub int8_matmul: String,
    /// Products of an INT8 encoder's float convolutional front (stem, stage 0): `auto` (W8A16
    /// integers where that is faster: x86_64 with AVX2 or VNNI), `f32`.
    pub conv_blocks: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dir: PathBuf::new(),
            encoder: "auto".into(),
            decoder: "auto".into(),
            threads: 0,
            int8_matmul: "auto".into(),
            conv_blocks: "auto".into(),
        }
    }
}

/// `[socket]`: where subscribers connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// Unix socket path; empty: `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR` or /tmp.
    pub path: PathBuf,
    /// File mode, octal string.
    pub mode: String,
    /// Group that owns the socket; empty: the daemon's.
    pub group: String,
    /// Most clients at once.
    pub max_clients: usize,
    /// Results queued per subscriber before frames are dropped for it.
    pub queue: usize,
    /// A subscriber whose socket accepts nothing for this long is disconnected (ms).
    pub stall_timeout_ms: u64,
    /// A connection that sends nothing for this long, with no standing subscription whose
    /// results it reads, is closed (s); 0: never.
    pub idle_timeout_s: u64,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: PathBuf::new(),
            mode: "0660".into(),
            group: String::new(),
            max_clients: 32,
            queue: 4,
            stall_timeout_ms: 2000,
            idle_timeout_s: 60,
        }
    }
}

impl SocketConfig {
    /// The socket path: `path`, or [`default_socket_path`] when it is empty.
    pub fn resolved_path(&self) -> PathBuf {
        if self.path.as_os_str().is_empty() {
            default_socket_path()
        } else {
            self.path.clone()
        }
    }
}

/// `[pipeline]`: buffering between stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Embeddings of the most recent frames kept for prompts that name a frame.
    pub ring: usize,
    /// Seconds between metric lines in the log (0: never).
    pub stats_interval_s: f32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            ring: 4,
            stats_interval_s: 10.0,
        }
    }
}

/// `[everything]`: the segment-everything generator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EverythingConfig {
    /// `hierarchical` (TinySAM) or `flat` (SAM).
    pub strategy: String,
    /// Dense grid side.
    pub points_per_side: usize,
    /// Minimum predicted IoU.
    pub pred_iou_thresh: f32,
    /// Minimum stability score.
    pub stability_thresh: f32,
    /// Box NMS threshold.
    pub box_nms_thresh: f32,
    /// Remove holes and islands below this area (pixels); 0: off.
    pub min_region_area: u64,
}

impl Default for EverythingConfig {
    fn default() -> Self {
        let p = EverythingParams::default();
        EverythingConfig {
            strategy: "hierarchical".into(),
            points_per_side: p.points_per_side,
            pred_iou_thresh: p.pred_iou_thresh,
            stability_thresh: p.stability_score_thresh,
            box_nms_thresh: p.box_nms_thresh,
            min_region_area: p.min_mask_region_area,
        }
    }
}

/// `[ros2]`: the `tinysam-ros2` bridge (the daemon checks this table but does not use it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ros2Config {
    /// Middleware: `dds` (ROS 2's default RMW, interoperates with Fast DDS and Cyclone DDS) or
    /// `zenoh` (`rmw_zenoh`; needs a build with the `zenoh` feature).
    pub transport: String,
    /// ROS domain id 0..=232; -1: `$ROS_DOMAIN_ID`, else 0.
    pub domain_id: i64,
    /// Node namespace, `/` or `/a/b`.
    pub namespace: String,
    /// Node name; topics are `<namespace>/<node>/masks` and so on.
    pub node_name: String,
    /// `header.frame_id` of everything published.
    pub frame_id: String,
    /// Segment everything in every frame.
    pub everything: bool,
    /// Standing points `"x,y[,label]"`, joined into one prompt (or into the first box's).
    pub points: Vec<String>,
    /// Standing boxes `"x0,y0,x1,y1"`, one prompt each.
    pub boxes: Vec<String>,
    /// Most standing results per second; 0: every frame.
    pub max_rate_hz: f32,
    /// Publish the `mono16` label image on `~/masks` (detections are always published).
    pub publish_masks: bool,
    /// Publish the masks over the frame, JPEG, on `~/overlay/compressed` (for RViz; the daemon
    /// then sends every result's frame).
    pub publish_overlay: bool,
    /// Zenoh router to connect to (transport `zenoh`): `tcp/<host>:<port>`, rmw_zenohd's
    /// `tcp/127.0.0.1:7447` by default. `$ZENOH_SESSION_CONFIG_URI` replaces the whole session
    /// configuration, as it does for rmw_zenoh.
    pub zenoh_router: String,
}

impl Default for Ros2Config {
    fn default() -> Self {
        Ros2Config {
            transport: "dds".into(),
            domain_id: -1,
            namespace: "/".into(),
            node_name: "tinysam".into(),
            frame_id: "camera".into(),
            everything: false,
            points: Vec::new(),
            boxes: Vec::new(),
            max_rate_hz: 0.0,
            publish_masks: true,
            publish_overlay: false,
            zenoh_router: "tcp/127.0.0.1:7447".into(),
        }
    }
}

/// The ROS 2 middleware of the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ros2Transport {
    /// DDS (RTPS), ROS 2's default.
    Dds,
    /// Zenoh, for `rmw_zenoh` systems.
    Zenoh,
}

/// `[ros2]`, checked and resolved.
#[derive(Debug, Clone)]
pub struct Ros2Settings {
    /// Middleware.
    pub transport: Ros2Transport,
    /// Domain id (the file's, else `$ROS_DOMAIN_ID`, else 0).
    pub domain_id: u16,
    /// Node namespace.
    pub namespace: String,
    /// Node name.
    pub node_name: String,
    /// `header.frame_id`.
    pub frame_id: String,
    /// Standing prompts.
    pub standing: crate::ros2::Standing,
    /// Most standing results per second (0: every frame).
    pub max_rate_hz: f32,
    /// Whether to publish the label image.
    pub publish_masks: bool,
    /// Whether to publish the overlay.
    pub publish_overlay: bool,
    /// Zenoh router endpoint.
    pub zenoh_router: String,
}

impl Ros2Settings {
    /// The node's private namespace, where `~/masks` lives: `<namespace>/<node>`.
    pub fn private_namespace(&self) -> String {
        match self.namespace.as_str() {
            "/" => format!("/{}", self.node_name),
            ns => format!("{ns}/{}", self.node_name),
        }
    }
}

/// A ROS name token: a letter or `_` first, then letters, digits and single `_`s.
fn is_ros_token(token: &str) -> bool {
    token.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !token.contains("__")
}

impl Ros2Config {
    /// Check every value; `ros_domain_id` is `$ROS_DOMAIN_ID` as the environment has it.
    pub fn validate(&self, ros_domain_id: Option<&str>) -> Result<Ros2Settings, ConfigError> {
        let transport = match self.transport.as_str() {
            "dds" => Ros2Transport::Dds,
            "zenoh" => Ros2Transport::Zenoh,
            other => {
                return Err(invalid(
                    "ros2.transport",
                    format!("{other:?}"),
                    "expected dds or zenoh",
                ))
            }
        };
        // 232: the highest id whose RTPS ports (7400 + 250 x id + offsets) fit in 16 bits.
        let domain_id = match (
            self.domain_id,
            ros_domain_id.filter(|v| !v.trim().is_empty()),
        ) {
            (-1, None) => 0,
            (-1, Some(env)) => env
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|d| *d <= 232)
                .ok_or_else(|| {
                    invalid(
                        "ros2.domain_id",
                        format!("ROS_DOMAIN_ID={env:?}"),
                        "ROS_DOMAIN_ID must be 0..=232",
                    )
                })?,
            (id, _) => u16::try_from(id)
                .ok()
                .filter(|d| *d <= 232)
                .ok_or_else(|| {
                    invalid(
                        "ros2.domain_id",
                        id.to_string(),
                        "must be 0..=232, or -1 for $ROS_DOMAIN_ID",
                    )
                })?,
        };
        let namespace_ok = self.namespace == "/"
            || self
                .namespace
                .strip_prefix('/')
                .is_some_and(|rest| rest.split('/').all(is_ros_token));
        if !namespace_ok {
            return Err(invalid(
                "ros2.namespace",
                format!("{:?}", self.namespace),
                "expected / or /name[/name...] (letters, digits, _)",
            ));
        }
        if !is_ros_token(&self.node_name) {
            return Err(invalid(
                "ros2.node_name",
                format!("{:?}", self.node_name),
                "expected a letter or _ then letters, digits, single _",
            ));
        }
        if self.frame_id.is_empty() || self.frame_id.len() > 256 {
            return Err(invalid(
                "ros2.frame_id",
                format!("{:?}", self.frame_id),
                "must be 1..=256 bytes",
            ));
        }
        let points = self
            .points
            .iter()
            .map(|p| {
                p.parse::<crate::prompt::PromptPoint>()
                    .ok()
                    .filter(|q| q.x.is_finite() && q.y.is_finite() && q.x >= 0.0 && q.y >= 0.0)
                    .ok_or_else(|| {
                        invalid(
                            "ros2.points",
                            format!("{p:?}"),
                            "expected \"x,y[,label]\" with x, y >= 0 and label 1 or 0",
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let boxes = self
            .boxes
            .iter()
            .map(|b| {
                b.parse::<crate::prompt::BoxPrompt>()
                    .ok()
                    .filter(|q| {
                        [q.x0, q.y0, q.x1, q.y1]
                            .iter()
                            .all(|v| v.is_finite() && *v >= 0.0)
                            && q.x0 < q.x1
                            && q.y0 < q.y1
                    })
                    .ok_or_else(|| {
                        invalid(
                            "ros2.boxes",
                            format!("{b:?}"),
                            "expected \"x0,y0,x1,y1\" with 0 <= x0 < x1, 0 <= y0 < y1",
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if points.len() > crate::protocol::MAX_POINTS || boxes.len() > crate::protocol::MAX_PROMPTS
        {
            return Err(invalid(
                "ros2.points",
                format!("{} points, {} boxes", points.len(), boxes.len()),
                "too many for one subscription",
            ));
        }
        let standing = match (self.everything, points.is_empty() && boxes.is_empty()) {
            (true, false) => {
                return Err(invalid(
                    "ros2.everything",
                    "true".into(),
                    "cannot be combined with points or boxes",
                ))
            }
            (true, true) => crate::ros2::Standing::Everything,
            (false, true) => crate::ros2::Standing::Nothing,
            (false, false) => crate::ros2::Standing::Prompts(
                crate::protocol::WirePrompt::from_points_and_boxes(&points, &boxes),
            ),
        };
        // TCP is the one Zenoh transport the bridge is built with (rmw_zenoh's default).
        let router_ok = self
            .zenoh_router
            .strip_prefix("tcp/")
            .and_then(|address| address.rsplit_once(':'))
            .is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.contains(char::is_whitespace)
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !router_ok {
            return Err(invalid(
                "ros2.zenoh_router",
                format!("{:?}", self.zenoh_router),
                "expected tcp/<host>:<port>, e.g. tcp/127.0.0.1:7447",
            ));
        }
        let rate = self.max_rate_hz;
        if !(rate == 0.0
            || (crate::protocol::MIN_RATE_HZ..=crate::protocol::MAX_RATE_HZ).contains(&rate))
        {
            return Err(invalid(
                "ros2.max_rate_hz",
                rate.to_string(),
                "must be 0 (every frame) or 0.001..=1000",
            ));
        }
        Ok(Ros2Settings {
            transport,
            domain_id,
            namespace: self.namespace.clone(),
            node_name: self.node_name.clone(),
            frame_id: self.frame_id.clone(),
            standing,
            max_rate_hz: rate,
            publish_masks: self.publish_masks,
            publish_overlay: self.publish_overlay,
            zenoh_router: self.zenoh_router.clone(),
        })
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[source]`.
    pub source: SourceConfig,
    /// `[model]`.
    pub model: ModelConfig,
    /// `[socket]`.
    pub socket: SocketConfig,
    /// `[pipeline]`.
    pub pipeline: PipelineConfig,
    /// `[everything]`.
    pub everything: EverythingConfig,
    /// `[ros2]` (the bridge's).
    pub ros2: Ros2Config,
}

/// The parts of a [`Config`] that code uses, checked and converted.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The source.
    pub source: SourceKind,
    /// The raw `[source]` table (sizes, fps, loop).
    pub source_config: SourceConfig,
    /// V4L2 pixel format, `None` for auto.
    pub pixel_format: Option<PixelFormat>,
    /// Model directory (resolved).
    pub model_dir: PathBuf,
    /// Encoder precision, `None` for the manifest's.
    pub encoder: Option<crate::model::Precision>,
    /// Decoder precision, `None` for the manifest's.
    pub decoder: Option<crate::model::Precision>,
    /// Inference threads (resolved, ≥ 1).
    pub threads: usize,
    /// INT8 matmul implementation.
    pub int8_matmul: crate::model::Int8Matmul,
    /// How an INT8 encoder's float convolutional front runs its products.
    pub conv_blocks: crate::model::ConvBlocks,
    /// Socket path (resolved).
    pub socket_path: PathBuf,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Socket group, if any.
    pub socket_group: Option<String>,
    /// Client cap.
    pub max_clients: usize,
    /// Per-subscriber queue length.
    pub queue: usize,
    /// Stall timeout.
    pub stall_timeout: std::time::Duration,
    /// Idle timeout (`None`: never).
    pub idle_timeout: Option<std::time::Duration>,
    /// Embedding ring size.
    pub ring: usize,
    /// Metric log interval (`None`: never).
    pub stats_interval: Option<std::time::Duration>,
    /// Everything-mode parameters.
    pub everything: EverythingParams,
}

impl Config {
    /// Read and parse a TOML file (no validation yet).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parse TOML text; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// Check every value and resolve defaults (socket path, model dir, threads).
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        // The bridge's table, checked here too so that `tinysamd --check-config` names its
        // mistakes (the environment's ROS_DOMAIN_ID is the bridge's business).
        self.ros2.validate(None)?;
        let s = &self.source;
        let source = SourceKind::parse(&s.uri)?;
        for (key, v) in [("source.width", s.width), ("source.height", s.height)] {
            if !(16..=8192).contains(&v) || v % 2 != 0 {
                return Err(invalid(key, v.to_string(), "must be even, 16..=8192"));
            }
        }
        if !(0.0..=240.0).contains(&s.fps) || !s.fps.is_finite() {
            return Err(invalid("source.fps", s.fps.to_string(), "must be 0..=240"));
        }
        let pixel_format = match s.format.as_str() {
            "auto" => None,
            "mjpeg" => Some(PixelFormat::Mjpeg),
            "yuyv" => Some(PixelFormat::Yuyv),
            "nv12" => Some(PixelFormat::Nv12),
            "rgb24" => Some(PixelFormat::Rgb24),
            other => {
                return Err(invalid(
                    "source.format",
                    format!("{other:?}"),
                    "expected auto, mjpeg, yuyv, nv12 or rgb24",
                ))
            }
        };
        let precision = |key: &'static str, v: &str| match v {
            "auto" => Ok(None),
            "int8" => Ok(Some(crate::model::Precision::Int8)),
            "fp32" => Ok(Some(crate::model::Precision::Fp32)),
            other => Err(invalid(
                key,
                format!("{other:?}"),
                "expected auto, int8 or fp32",
            )),
        };
        let encoder = precision("model.encoder", &self.model.encoder)?;
        let decoder = precision("model.decoder", &self.model.decoder)?;
        let int8_matmul: crate::model::Int8Matmul = choice(
            "model.int8_matmul",
            &self.model.int8_matmul,
            "expected auto, tract, portable, avx2, vnni or sdot",
        )?;
        let conv_blocks: crate::model::ConvBlocks = choice(
            "model.conv_blocks",
            &self.model.conv_blocks,
            "expected auto, w8a16 or f32",
        )?;
        if let Some(kernel) = int8_matmul.kernel() {
            if !kernel.is_supported() {
                return Err(invalid(
                    "model.int8_matmul",
                    format!("{:?}", self.model.int8_matmul),
                    "this CPU cannot run that kernel",
                ));
            }
        }
        if self.model.threads > 256 {
            return Err(invalid(
                "model.threads",
                self.model.threads.to_string(),
                "must be 0 (all cores) ..= 256",
            ));
        }
        let threads = match self.model.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let model_dir = if self.model.dir.as_os_str().is_empty() {
            crate::model::default_model_dir()
        } else {
            self.model.dir.clone()
        };
        let k = &self.socket;
        let socket_path = k.resolved_path();
        // sun_path holds 108 bytes including the terminating NUL.
        if socket_path.as_os_str().len() >= 108 {
            return Err(invalid(
                "socket.path",
                socket_path.display().to_string(),
                "longer than a Unix socket path may be (107 bytes)",
            ));
        }
        let socket_mode = u32::from_str_radix(k.mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "socket.mode",
                    format!("{:?}", k.mode),
                    "expected an octal mode such as \"0660\"",
                )
            })?;
        if !(1..=1024).contains(&k.max_clients) {
            return Err(invalid(
                "socket.max_clients",
                k.max_clients.to_string(),
                "must be 1..=1024",
            ));
        }
        if !(1..=256).contains(&k.queue) {
            return Err(invalid(
                "socket.queue",
                k.queue.to_string(),
                "must be 1..=256",
            ));
        }
        if !(50..=600_000).contains(&k.stall_timeout_ms) {
            return Err(invalid(
                "socket.stall_timeout_ms",
                k.stall_timeout_ms.to_string(),
                "must be 50..=600000",
            ));
        }
        if k.idle_timeout_s > 86_400 {
            return Err(invalid(
                "socket.idle_timeout_s",
                k.idle_timeout_s.to_string(),
                "must be 0 (never) or 1..=86400",
            ));
        }
        let p = &self.pipeline;
        if !(1..=64).contains(&p.ring) {
            return Err(invalid(
                "pipeline.ring",
                p.ring.to_string(),
                "must be 1..=64",
            ));
        }
        if !(0.0..=86_400.0).contains(&p.stats_interval_s) {
            return Err(invalid(
                "pipeline.stats_interval_s",
                p.stats_interval_s.to_string(),
                "must be 0..=86400",
            ));
        }
        let e = &self.everything;
        let strategy = match e.strategy.as_str() {
            "hierarchical" => Strategy::Hierarchical,
            "flat" => Strategy::Flat,
            other => {
                return Err(invalid(
                    "everything.strategy",
                    format!("{other:?}"),
                    "expected hierarchical or flat",
                ))
            }
        };
        if !(4..=128).contains(&e.points_per_side) {
            return Err(invalid(
                "everything.points_per_side",
                e.points_per_side.to_string(),
                "must be 4..=128",
            ));
        }
        for (key, v) in [
            ("everything.pred_iou_thresh", e.pred_iou_thresh),
            ("everything.stability_thresh", e.stability_thresh),
            ("everything.box_nms_thresh", e.box_nms_thresh),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(key, v.to_string(), "must be 0..=1"));
            }
        }
        let everything = EverythingParams {
            strategy,
            points_per_side: e.points_per_side,
            pred_iou_thresh: e.pred_iou_thresh,
            stability_score_thresh: e.stability_thresh,
            box_nms_thresh: e.box_nms_thresh,
            min_mask_region_area: e.min_region_area,
            ..EverythingParams::default()
        };
        Ok(Settings {
            source,
            source_config: s.clone(),
            pixel_format,
            model_dir,
            encoder,
            decoder,
            int8_matmul,
            conv_blocks,
            threads,
            socket_path,
            socket_mode,
            socket_group: (!k.group.is_empty()).then(|| k.group.clone()),
            max_clients: k.max_clients,
            queue: k.queue,
            stall_timeout: std::time::Duration::from_millis(k.stall_timeout_ms),
            idle_timeout: (k.idle_timeout_s > 0)
                .then(|| std::time::Duration::from_secs(k.idle_timeout_s)),
            ring: p.ring,
            stats_interval: (p.stats_interval_s > 0.0)
                .then(|| std::time::Duration::from_secs_f32(p.stats_interval_s)),
            everything,
        })
    }
}

/// `$RUNTIME_DIRECTORY/tinysamd.sock` under systemd, else `$XDG_RUNTIME_DIR/tinysamd.sock`, else
/// `/tmp/tinysamd-UID.sock`.
pub fn default_socket_path() -> PathBuf {
    for var in ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"] {
        if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            // RuntimeDirectory= may list several directories, separated by ':'.
            let first = dir
                .to_string_lossy()
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            return PathBuf::from(first).join("tinysamd.sock");
        }
    }
    PathBuf::from(format!("/tmp/tinysamd-{}.sock", nix::unistd::getuid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/config.md` lists every key of every table with its real default, and nothing that
    /// is not a key: the document cannot drift from the structs.
    #[test]
    fn docs_config_lists_every_key_with_its_default() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.md"),
        )
        .expect("docs/config.md");
        // (table, key) -> the documented default, from rows `| `key`[, `key`] | default[, …] |`.
        let mut documented = std::collections::BTreeMap::new();
        let mut table = None;
        for line in doc.lines() {
            if let Some(rest) = line.strip_prefix("## `[") {
                table = rest.split(']').next().map(str::to_string);
                continue;
            }
            let (Some(t), Some(row)) = (&table, line.strip_prefix("| `")) else {
                continue;
            };
            let cells: Vec<&str> = row.split(" | ").collect();
            let keys: Vec<&str> = cells[0].split(", ").map(|k| k.trim_matches('`')).collect();
            let defaults: Vec<&str> = cells[1]
                .split("`, `")
                .map(|d| d.trim_matches('`'))
                .collect();
            assert_eq!(keys.len(), defaults.len(), "{line}");
            for (k, d) in keys.into_iter().zip(defaults) {
                documented.insert((t.clone(), k.to_string()), d.to_string());
            }
        }
        let defaults = toml::Value::try_from(Config::default()).expect("defaults as TOML");
        let mut actual = std::collections::BTreeMap::new();
        for (t, keys) in defaults.as_table().expect("tables") {
            for (k, v) in keys.as_table().expect("keys") {
                actual.insert((t.clone(), k.clone()), v.clone());
            }
        }
        let doc_keys: Vec<_> = documented.keys().collect();
        let real_keys: Vec<_> = actual.keys().collect();
        assert_eq!(
            doc_keys, real_keys,
            "keys in docs/config.md vs the config structs"
        );
        for (key, value) in &actual {
            let text = &documented[key];
            let parsed: toml::Table =
                toml::from_str(&format!("v = {text}")).unwrap_or_else(|e| panic!("{key:?}: {e}"));
            let same = match (&parsed["v"], value) {
                (a, b) if a == b => true,
                // Numbers as the f32 settings hold them (0.7 is 0.699999988 in f32).
                (a, b) => {
                    let number = |v: &toml::Value| {
                        v.as_float()
                            .or(v.as_integer().map(|i| i as f64))
                            .map(|f| f as f32)
                    };
                    number(a).is_some() && number(a) == number(b)
                }
            };
            assert!(same, "{key:?}: docs say {text}, the default is {value}");
        }
    }

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))?.validate()
    }

    /// The bridge's table: the domain id from the file, then the environment, then 0; every
    /// malformed value named by its key; standing prompts as `tinysam sub` builds them.
    #[test]
    fn ros2_table_is_checked() {
        let ros2 = |text: &str, env: Option<&str>| {
            Config::from_toml(text, Path::new("t.toml")).and_then(|c| c.ros2.validate(env))
        };
        assert_eq!(ros2("", None).unwrap().domain_id, 0);
        assert_eq!(ros2("", Some("42")).unwrap().domain_id, 42);
        assert_eq!(
            ros2("[ros2]\ndomain_id = 7", Some("42")).unwrap().domain_id,
            7
        );
        let s = ros2(
            "[ros2]\npoints = [\"10,20\", \"30,40,0\"]\nboxes = [\"1,2,50,60\", \"5,5,9,9\"]",
            None,
        )
        .unwrap();
        let crate::ros2::Standing::Prompts(p) = s.standing else {
            panic!("standing prompts expected")
        };
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].points, [(10.0, 20.0, 1), (30.0, 40.0, 0)]);
        assert_eq!(p[1].bbox, Some([5.0, 5.0, 9.0, 9.0]));
        assert_eq!(
            ros2("[ros2]\neverything = true", None).unwrap().standing,
            crate::ros2::Standing::Everything
        );
        for (text, env, key) in [
            ("[ros2]\ndomain_id = 233", None, "ros2.domain_id"),
            ("[ros2]\ndomain_id = -2", None, "ros2.domain_id"),
            ("", Some("banana"), "ros2.domain_id"),
            ("[ros2]\ntransport = \"xrce\"", None, "ros2.transport"),
            (
                "[ros2]\nzenoh_router = \"udp/1.2.3.4:7447\"",
                None,
                "ros2.zenoh_router",
            ),
            (
                "[ros2]\nzenoh_router = \"tcp/1.2.3.4\"",
                None,
                "ros2.zenoh_router",
            ),
            (
                "[ros2]\nzenoh_router = \"tcp/:7447\"",
                None,
                "ros2.zenoh_router",
            ),
            (
                "[ros2]\nzenoh_router = \"tcp/host:0\"",
                None,
                "ros2.zenoh_router",
            ),
            ("[ros2]\nnamespace = \"robot\"", None, "ros2.namespace"),
            ("[ros2]\nnamespace = \"/a//b\"", None, "ros2.namespace"),
            ("[ros2]\nnode_name = \"2fast\"", None, "ros2.node_name"),
            ("[ros2]\nframe_id = \"\"", None, "ros2.frame_id"),
            ("[ros2]\npoints = [\"1,nan\"]", None, "ros2.points"),
            ("[ros2]\nboxes = [\"5,5,1,9\"]", None, "ros2.boxes"),
            (
                "[ros2]\neverything = true\npoints = [\"1,2\"]",
                None,
                "ros2.everything",
            ),
            ("[ros2]\nmax_rate_hz = -1", None, "ros2.max_rate_hz"),
        ] {
            match ros2(text, env) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text} {env:?}: {other:?}"),
            }
        }
        // The daemon refuses a file with a bad [ros2] table too.
        assert!(parse("[ros2]\nnode_name = \"a-b\"").is_err());
    }

    #[test]
    fn defaults_are_valid() {
        let s = parse("").unwrap();
        assert_eq!(s.source, SourceKind::Synthetic);
        assert_eq!(s.socket_mode, 0o660);
        assert_eq!(s.ring, 4);
        assert!(s.threads >= 1);
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let cases = [
            ("[source]\nfps = 500", "source.fps", "500"),
            ("[model]\nint8_matmul = \"amx\"", "model.int8_matmul", "amx"),
            (
                "[model]\nconv_blocks = \"int4\"",
                "model.conv_blocks",
                "int4",
            ),
            ("[source]\nwidth = 641", "source.width", "641"),
            ("[source]\nuri = \"usb:0\"", "source.uri", "usb:0"),
            ("[source]\nformat = \"h264\"", "source.format", "h264"),
            ("[model]\nencoder = \"int4\"", "model.encoder", "int4"),
            ("[socket]\nmode = \"rw\"", "socket.mode", "rw"),
            ("[socket]\nqueue = 0", "socket.queue", "0"),
            ("[pipeline]\nring = 0", "pipeline.ring", "0"),
            (
                "[everything]\npred_iou_thresh = 2.0",
                "everything.pred_iou_thresh",
                "2",
            ),
            (
                "[everything]\nstrategy = \"grid\"",
                "everything.strategy",
                "grid",
            ),
        ];
        for (text, key, value) in cases {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains(key) && msg.contains(value), "{text}: {msg}");
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_named() {
        let msg = parse("[source]\nframerate = 5").unwrap_err().to_string();
        assert!(msg.contains("framerate"), "{msg}");
        let msg = parse("[source]\nwidth = \"wide\"").unwrap_err().to_string();
        assert!(msg.contains("width") || msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            SourceKind::parse("v4l2:/dev/video2").unwrap(),
            SourceKind::V4l2("/dev/video2".into())
        );
        assert_eq!(
            SourceKind::parse("file:/tmp/x").unwrap(),
            SourceKind::File("/tmp/x".into())
        );
        assert!(SourceKind::parse("file:").is_err());
    }
}
