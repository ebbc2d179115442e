//! What goes wrong with a message, and the error codes the server sends back.

use serde::{Deserialize, Serialize};

use super::{Kind, PROTOCOL_VERSION};

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
