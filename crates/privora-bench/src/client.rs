//! One bench user's WebSocket: connect, log in, and wait until the login is complete (the
//! `contacts` frame, which a Privora server sends once per login, after `offline` and `history`).

use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use privora_protocol::{ClientFrame, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::relay::ws_config;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type Sink = SplitSink<Ws, Message>;
pub type Stream = SplitStream<Ws>;

const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Opens a WebSocket (Nagle off, 4 KiB read buffer).
pub async fn connect(url: &str) -> anyhow::Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    Ok(ws)
}

/// Sends `login` and returns once the server has sent `contacts`. Every frame before it is
/// handed to `before` (the catch-up scenario counts `offline` frames there).
/// With `acks`, the login asks for them (docs/protocol.md).
pub async fn log_in(
    ws: &mut Ws,
    token: &str,
    acks: bool,
    mut before: impl FnMut(&ServerFrame),
) -> anyhow::Result<()> {
    ws.send(text(&ClientFrame::Login { token: token.to_string(), acks })).await?;
    tokio::time::timeout(LOGIN_TIMEOUT, async {
        while let Some(message) = ws.next().await {
            let Message::Text(text) = message? else { continue };
            let frame = ServerFrame::decode(&text).context("the server sent an undecodable frame")?;
            match frame {
                ServerFrame::Contacts { .. } => return Ok(()),
                ServerFrame::Error { code, message } => bail!("login refused: {} {message}", code.as_str()),
                other => before(&other),
            }
        }
        bail!("the server closed the connection during login")
    })
    .await
    .context("login took more than 60 s")?
}

/// Connects and logs in.
pub async fn open(url: &str, token: &str, acks: bool) -> anyhow::Result<Ws> {
    let mut ws = connect(url).await?;
    log_in(&mut ws, token, acks, |_| {}).await?;
    Ok(ws)
}

pub fn text(frame: &ClientFrame) -> Message {
    Message::Text(frame.encode().into())
}
