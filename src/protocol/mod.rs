//! The wire protocol between `tinysamd` and its subscribers (see `docs/protocol.md`).
//!
//! Every message is a 12-byte header — magic `TSAM`, protocol version (u16 LE), message kind
//! (u16 LE), body length (u32 LE) — followed by a MessagePack body (a map with named fields).
//! This module is pure: it parses and builds bytes and checks every size and count, and never
//! touches a socket. Parsing never panics and never allocates more than the capped body length.

//!
//! One module a concern: `framing` (header, kinds, reading a frame), `messages` (the bodies),
//! `validation` (the rules a client's message must meet, in one place) and `error` (what goes
//! wrong, and the codes sent back for it); all their public items are re-exported here.

mod error;
mod framing;
mod messages;
mod validation;

pub use crate::postprocess::MaskEncoding;
pub use error::{ErrorCode, ProtocolError};
pub use framing::{read_frame, Header, Kind};
pub use messages::*;

use framing::body;
use validation::decode;

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
            Kind::Hello => ClientMessage::Hello(validation::hello(decode(k, bytes)?)?),
            Kind::Subscribe => ClientMessage::Subscribe(validation::subscribe(decode(k, bytes)?)?),
            Kind::Unsubscribe => ClientMessage::Unsubscribe(decode(k, bytes)?),
            Kind::PromptRequest => {
                ClientMessage::PromptRequest(validation::prompt_request(decode(k, bytes)?)?)
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
            frames: false,
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
                frames: false,
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
            frame_jpeg: None,
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
            frames: false,
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
            frames: false,
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
                frames: false,
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
                frames: false,
            });
            prop_assert_eq!(parse_client_bytes(&m.encode()).unwrap(), m);
        }
    }
}
