//! Real clients for tests: J-IM binary over TCP and J-IM JSON over WebSocket, behind one
//! [`Client`] trait so that a scenario can run over either (the parity test).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use schema::frame;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// How long a test waits for one frame.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// A J-IM client over some transport.
#[allow(async_fn_in_trait)]
pub trait Client {
    /// Sends a JSON request; `cmd` is taken from the body.
    async fn send(&mut self, body: Value) -> anyhow::Result<()>;
    /// The next frame's JSON body from the wire, or an error after [`RECV_TIMEOUT`] or when the
    /// server closed.
    async fn recv_wire(&mut self) -> anyhow::Result<Value>;
    /// Frames read past by [`Client::recv_cmd`], kept for later calls.
    fn backlog(&mut self) -> &mut VecDeque<Value>;

    /// The next frame, from the backlog first.
    async fn recv(&mut self) -> anyhow::Result<Value> {
        match self.backlog().pop_front() {
            Some(v) => Ok(v),
            None => self.recv_wire().await,
        }
    }

    /// The first frame with `command == cmd`; frames of other commands stay in the backlog.
    async fn recv_cmd(&mut self, cmd: u64) -> anyhow::Result<Value> {
        if let Some(i) = self.backlog().iter().position(|v| v["command"].as_u64() == Some(cmd)) {
            return Ok(self.backlog().remove(i).unwrap_or_default());
        }
        loop {
            let v = self.recv_wire().await?;
            if v["command"].as_u64() == Some(cmd) {
                return Ok(v);
            }
            self.backlog().push_back(v);
        }
    }

    /// Drops the backlog.
    fn clear_backlog(&mut self) {
        self.backlog().clear();
    }

    /// Logs in with cmd 5 and waits for the reply.
    async fn login(&mut self, user: &str, password: &str) -> anyhow::Result<Value> {
        self.send(json!({"cmd": 5, "userId": user, "password": password})).await?;
        let reply = self.recv_cmd(6).await?;
        if reply["code"] != 10007 {
            bail!("login failed: {reply}");
        }
        Ok(reply)
    }

    /// Sends a chat and waits for the cmd 12 reply.
    async fn chat(&mut self, body: Value) -> anyhow::Result<Value> {
        let mut body = body;
        body["cmd"] = json!(11);
        self.send(body).await?;
        self.recv_cmd(12).await
    }
}

/// A byte stream a client can run over: plain TCP or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// J-IM binary over TCP (or over TLS with ALPN `kefu-tcp/1`).
pub struct TcpClient {
    stream: Box<dyn Io>,
    buf: BytesMut,
    /// The mask byte of the last frame received.
    pub last_mask: u8,
    /// The synSeq of the last frame received.
    pub last_syn_seq: Option<i32>,
    backlog: VecDeque<Value>,
}

impl TcpClient {
    /// Connects.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<TcpClient> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(TcpClient::over(stream))
    }

    /// A client over an established stream (e.g. a TLS stream).
    pub fn over(stream: impl Io + 'static) -> TcpClient {
        TcpClient { stream: Box::new(stream), buf: BytesMut::new(), last_mask: 0, last_syn_seq: None, backlog: VecDeque::new() }
    }

    /// Writes raw bytes.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Sends a frame with an explicit command byte and synSeq.
    pub async fn send_frame(&mut self, cmd: u8, syn_seq: Option<i32>, body: &[u8]) -> anyhow::Result<()> {
        self.write_raw(&frame::encode_request(cmd, syn_seq, body)).await
    }

    /// The next frame: command and JSON body.
    pub async fn recv_frame(&mut self) -> anyhow::Result<(u8, Value)> {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        loop {
            if self.buf.len() >= 2 {
                self.last_mask = self.buf[1];
            }
            let syn = self.buf.len() >= 6 && self.buf[1] & frame::HAS_SYNSEQ != 0;
            if syn {
                self.last_syn_seq = Some(i32::from_be_bytes([self.buf[2], self.buf[3], self.buf[4], self.buf[5]]));
            }
            if let Some(f) = frame::decode(&mut self.buf, usize::MAX >> 1).map_err(|e| anyhow!("server sent a bad frame: {e}"))? {
                if !syn {
                    self.last_syn_seq = None;
                }
                let v = serde_json::from_slice(&f.body).with_context(|| format!("body {:?}", String::from_utf8_lossy(&f.body)))?;
                return Ok((f.cmd.code(), v));
            }
            let n =
                tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await.context("timed out waiting for a frame")??;
            if n == 0 {
                bail!("connection closed by the server");
            }
        }
    }

    /// Waits until the server closes the connection (reading and discarding frames).
    pub async fn closed(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        let mut scratch = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await.context("the server did not close")? {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            }
        }
    }
}

impl Client for TcpClient {
    async fn send(&mut self, body: Value) -> anyhow::Result<()> {
        let cmd = body["cmd"].as_u64().and_then(|c| u8::try_from(c).ok()).ok_or_else(|| anyhow!("body has no cmd"))?;
        self.send_frame(cmd, None, body.to_string().as_bytes()).await
    }

    fn backlog(&mut self) -> &mut VecDeque<Value> {
        &mut self.backlog
    }

    async fn recv_wire(&mut self) -> anyhow::Result<Value> {
        let (cmd, v) = self.recv_frame().await?;
        if v["command"].as_u64() != Some(u64::from(cmd)) {
            bail!("header cmd {cmd} disagrees with body {v}");
        }
        Ok(v)
    }
}

type Ws = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// J-IM JSON over WebSocket (plain or inside TLS).
pub struct WsClient {
    ws: Ws,
    backlog: VecDeque<Value>,
}

impl WsClient {
    /// Connects to `url` (e.g. `ws://127.0.0.1:8888/?username=a&password=b`).
    pub async fn connect(url: &str) -> anyhow::Result<WsClient> {
        let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse()?;
        let host = uri.host().ok_or_else(|| anyhow!("no host in {url}"))?;
        let port = uri.port_u16().unwrap_or(80);
        let tcp = TcpStream::connect((host, port)).await?;
        let (ws, _) = tokio_tungstenite::client_async(url, Box::new(tcp) as Box<dyn Io>).await?;
        Ok(WsClient { ws, backlog: VecDeque::new() })
    }

    /// Opens a WebSocket to `url` over an established stream (e.g. TLS for `wss://`).
    pub async fn connect_over(url: &str, stream: impl Io + 'static) -> anyhow::Result<WsClient> {
        let (ws, _) = tokio_tungstenite::client_async(url, Box::new(stream) as Box<dyn Io>).await?;
        Ok(WsClient { ws, backlog: VecDeque::new() })
    }

    /// Sends any WebSocket message.
    pub async fn send_message(&mut self, m: Message) -> anyhow::Result<()> {
        self.ws.send(m).await?;
        Ok(())
    }

    /// The next message of any kind; `None` once the stream ends.
    pub async fn next_message(&mut self) -> anyhow::Result<Option<Message>> {
        match tokio::time::timeout(RECV_TIMEOUT, self.ws.next()).await.context("timed out waiting for a message")? {
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => Err(e.into()),
            None => Ok(None),
        }
    }
}

impl Client for WsClient {
    async fn send(&mut self, body: Value) -> anyhow::Result<()> {
        self.send_message(Message::text(body.to_string())).await
    }

    fn backlog(&mut self) -> &mut VecDeque<Value> {
        &mut self.backlog
    }

    async fn recv_wire(&mut self) -> anyhow::Result<Value> {
        loop {
            match self.next_message().await? {
                Some(Message::Text(t)) => return Ok(serde_json::from_str(t.as_str())?),
                Some(Message::Close(_)) | None => bail!("connection closed by the server"),
                Some(_) => continue,
            }
        }
    }
}
