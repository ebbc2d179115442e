//! Framing: the 12-byte header, the message kinds, and reading one frame from a stream.

use std::io::Read;

use serde::Serialize;

use super::{ProtocolError, HEADER_LEN, MAGIC, PROTOCOL_VERSION};

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

/// A message: its header, then its MessagePack body.
pub(super) fn body<T: Serialize>(kind: Kind, value: &T) -> Vec<u8> {
    // Serializing our own plain structs into a Vec cannot fail.
    let body = rmp_serde::to_vec_named(value).unwrap_or_default();
    let header = Header {
        version: PROTOCOL_VERSION,
        kind: kind as u16,
        // Our bodies are capped far below 4 GiB (`MAX_SERVER_BODY`); a larger one would be
        // refused by the reader's cap, never misread.
        length: u32::try_from(body.len()).unwrap_or(u32::MAX),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&body);
    out
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
