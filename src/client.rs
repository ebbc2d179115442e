//! A blocking Rust client for the daemon's socket: handshake, subscribe, prompt, status.
//! Used by `tinysam sub` and the integration tests; other languages follow `docs/protocol.md`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::protocol::{
    self, ClientMessage, ErrorReply, Header, Hello, PromptRequest, ProtocolError, ServerMessage,
    Status, StatusRequest, Subscribe, Welcome, HEADER_LEN, MAX_SERVER_BODY, PROTOCOL_VERSION,
};

/// Bytes asked of the socket per read while a message is incomplete.
const READ_CHUNK: usize = 64 * 1024;

/// How long [`Client::connect`] looks for the server's reason after the hello could not be sent.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);

/// What can go wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting or writing failed.
    #[error("talking to {0}")]
    Io(String, #[source] std::io::Error),
    /// The server sent bytes that are not a message.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The server answered with an error.
    #[error("tinysamd: {}: {}", .0.code, .0.message)]
    Server(ErrorReply),
    /// The server closed the connection.
    #[error("server closed the connection")]
    Closed,
    /// Nothing arrived in time.
    #[error("no message within {0:?}")]
    Timeout(Duration),
    /// The server sent something else than the handshake asked for.
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

/// A connected, greeted client.
pub struct Client {
    stream: UnixStream,
    path: String,
    /// Bytes received but not yet returned as a message: a [`Client::recv`] whose time runs out
    /// in the middle of a message keeps what arrived, and the next call completes it.
    inbox: Vec<u8>,
    /// The server's handshake answer.
    pub welcome: Welcome,
}

impl Client {
    /// Connect to `path` and shake hands as `name`.
    pub fn connect(path: &Path, name: &str) -> Result<Client, ClientError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|e| ClientError::Io(shown.clone(), e))?;
        let mut client = Client {
            stream,
            path: shown,
            inbox: Vec::new(),
            welcome: Welcome {
                version: 0,
                server: String::new(),
                client_id: 0,
                limits: protocol::Limits::current(),
            },
        };
        let hello = client.send(&ClientMessage::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client: name.chars().take(protocol::MAX_NAME_LEN).collect(),
        }));
        if let Err(sent) = hello {
            // A server that refuses a client (at its cap, say) writes why and closes at once,
            // possibly before the hello arrives: the reason is the better error.
            return Err(match client.recv(Some(REFUSAL_WAIT)) {
                Ok(ServerMessage::Error(e)) => ClientError::Server(e),
                _ => sent,
            });
        }
        match client.recv(Some(Duration::from_secs(10)))? {
            ServerMessage::Welcome(w) => client.welcome = w,
            ServerMessage::Error(e) => return Err(ClientError::Server(e)),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
        Ok(client)
    }

    /// Send one message.
    pub fn send(&mut self, msg: &ClientMessage) -> Result<(), ClientError> {
        self.send_raw(&msg.encode())
    }

    /// Send raw bytes (tests use this for malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream
            .write_all(bytes)
            .map_err(|e| ClientError::Io(self.path.clone(), e))
    }

    /// Receive one message, waiting at most `timeout` (forever with `None`).
    ///
    /// A timeout loses nothing: bytes of a message that has not fully arrived stay buffered for
    /// the next call, so polling with short timeouts is safe.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<ServerMessage, ClientError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some((kind, end)) = self.complete_message()? {
                let decoded = ServerMessage::decode(kind, &self.inbox[HEADER_LEN..end]);
                self.inbox.drain(..end);
                return Ok(decoded?);
            }
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    // `set_read_timeout` refuses a zero duration.
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Err(ClientError::Timeout(timeout.unwrap_or_default())),
                },
                None => None,
            };
            self.stream
                .set_read_timeout(wait)
                .map_err(|e| ClientError::Io(self.path.clone(), e))?;
            // Read straight into the inbox's tail; what was not filled is cut off again below.
            let filled = self.inbox.len();
            self.inbox.resize(filled + READ_CHUNK, 0);
            let read = self.stream.read(&mut self.inbox[filled..]);
            self.inbox.truncate(filled + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) if self.inbox.is_empty() => return Err(ClientError::Closed),
                Ok(0) => return Err(ProtocolError::Truncated.into()),
                Ok(_) => {}
                Err(e) => match e.kind() {
                    std::io::ErrorKind::Interrupted => {}
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        return Err(ClientError::Timeout(timeout.unwrap_or_default()))
                    }
                    std::io::ErrorKind::ConnectionReset => return Err(ClientError::Closed),
                    _ => return Err(ProtocolError::Io(e).into()),
                },
            }
        }
    }

    /// The kind and end offset of the first message in `inbox`, once all of it has arrived.
    fn complete_message(&self) -> Result<Option<(u16, usize)>, ProtocolError> {
        let Some(head) = self.inbox.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::parse(head, MAX_SERVER_BODY)?;
        let end = usize::try_from(header.length)
            .ok()
            .and_then(|len| len.checked_add(HEADER_LEN))
            .ok_or(ProtocolError::Truncated)?;
        Ok((self.inbox.len() >= end).then_some((header.kind, end)))
    }

    /// Start a subscription and wait for its confirmation.
    pub fn subscribe(&mut self, sub: Subscribe) -> Result<(), ClientError> {
        let id = sub.id;
        self.send(&ClientMessage::Subscribe(sub))?;
        loop {
            match self.recv(Some(Duration::from_secs(10)))? {
                ServerMessage::Subscribed(s) if s.id == id => return Ok(()),
                ServerMessage::Error(e) => return Err(ClientError::Server(e)),
                // Results of other subscriptions may already be on their way.
                _ => continue,
            }
        }
    }

    /// Send a prompt request (the answer arrives through [`Client::recv`]).
    pub fn request(&mut self, req: PromptRequest) -> Result<(), ClientError> {
        self.send(&ClientMessage::PromptRequest(req))
    }

    /// A second handle on this connection, for sending from another thread while this one
    /// waits in [`Client::recv`].
    pub fn sender(&self) -> Result<ClientSender, ClientError> {
        let stream = self
            .stream
            .try_clone()
            .map_err(|e| ClientError::Io(self.path.clone(), e))?;
        Ok(ClientSender {
            stream,
            path: self.path.clone(),
        })
    }

    /// Ask for and wait for a status report.
    pub fn status(&mut self, request_id: u32) -> Result<Status, ClientError> {
        self.send(&ClientMessage::StatusRequest(StatusRequest { request_id }))?;
        loop {
            match self.recv(Some(Duration::from_secs(10)))? {
                ServerMessage::Status(s) if s.request_id == request_id => return Ok(*s),
                ServerMessage::Error(e) => return Err(ClientError::Server(e)),
                _ => continue,
            }
        }
    }
}

/// The sending half of a [`Client`]'s connection (see [`Client::sender`]).
pub struct ClientSender {
    stream: UnixStream,
    path: String,
}

impl ClientSender {
    /// Send one message.
    pub fn send(&mut self, msg: &ClientMessage) -> Result<(), ClientError> {
        self.stream
            .write_all(&msg.encode())
            .map_err(|e| ClientError::Io(self.path.clone(), e))
    }

    /// Close the connection both ways: a [`Client::recv`] waiting on it returns
    /// [`ClientError::Closed`].
    pub fn shutdown(&self) {
        // Already closed by the peer is as good.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

    /// A server that sends its messages in pieces, each after the client reports a timeout:
    /// every piece boundary (inside the header, inside the body) falls between two `recv` calls.
    #[test]
    fn a_timeout_in_the_middle_of_a_message_loses_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let first = ServerMessage::Error(ErrorReply {
            id: Some(7),
            code: protocol::ErrorCode::InvalidRequest,
            message: "x".repeat(5000),
        })
        .encode();
        let second = ServerMessage::Subscribed(protocol::Subscribed { id: 9 }).encode();
        let (go, wait) = mpsc::channel::<()>();
        let pieces = [
            first[..5].to_vec(),
            first[5..40].to_vec(),
            first[40..].to_vec(),
        ];
        let server = std::thread::spawn(move || {
            let (mut peer, _) = listener.accept().expect("accept");
            protocol::read_frame(&mut peer, 1 << 16).expect("hello");
            let welcome = Welcome {
                version: PROTOCOL_VERSION,
                server: "test".into(),
                client_id: 1,
                limits: protocol::Limits::current(),
            };
            peer.write_all(&ServerMessage::Welcome(welcome).encode())
                .expect("welcome");
            for (i, piece) in pieces.iter().enumerate() {
                if i > 0 {
                    wait.recv().expect("client timed out");
                }
                peer.write_all(piece).expect("piece");
            }
            peer.write_all(&second).expect("second");
            wait.recv().ok(); // keep the connection open until the client is done
        });
        let mut client = Client::connect(&path, "t").expect("connect");
        for _ in 0..2 {
            let got = client.recv(Some(Duration::from_millis(30)));
            assert!(matches!(got, Err(ClientError::Timeout(_))), "{got:?}");
            go.send(()).expect("server");
        }
        match client.recv(Some(Duration::from_secs(10))).expect("first") {
            ServerMessage::Error(e) => {
                assert_eq!((e.id, e.message.len()), (Some(7), 5000));
            }
            other => panic!("{other:?}"),
        }
        let second = client.recv(Some(Duration::from_secs(10))).expect("second");
        assert_eq!(
            second,
            ServerMessage::Subscribed(protocol::Subscribed { id: 9 })
        );
        go.send(()).expect("server");
        server.join().expect("server thread");
    }
}
