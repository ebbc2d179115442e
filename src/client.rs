//! A blocking Rust client for the daemon's socket: handshake, subscribe, prompt, status.
//! Used by `tinysam sub` and the integration tests; other languages follow `docs/protocol.md`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::protocol::{
    self, ClientMessage, ErrorReply, Hello, PromptRequest, ProtocolError, ServerMessage, Status,
    StatusRequest, Subscribe, Welcome, MAX_SERVER_BODY, PROTOCOL_VERSION,
};

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
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<ServerMessage, ClientError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(|e| ClientError::Io(self.path.clone(), e))?;
        match protocol::read_frame(&mut self.stream, MAX_SERVER_BODY) {
            Ok(Some((header, body))) => Ok(ServerMessage::decode(header.kind, &body)?),
            Ok(None) => Err(ClientError::Closed),
            Err(ProtocolError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(ClientError::Timeout(timeout.unwrap_or_default()))
            }
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                Err(ClientError::Closed)
            }
            Err(e) => Err(e.into()),
        }
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
