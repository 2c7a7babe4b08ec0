//! A byte stream carried in binary WebSocket messages, for the reverse
//! tunnel where only HTTPS leaves the runner's network (DESIGN §10): the
//! same SSH stream as on the SSH port, on the API's listener. Both ends use
//! it, the gateway with axum's WebSocket and the agent with
//! tokio-tungstenite's.

use bytes::{Bytes, BytesMut};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The largest WebSocket message or frame either end takes; the sender
/// sends at most [`CHUNK`] bytes a message.
pub const MAX_MESSAGE: usize = 1 << 20;
const CHUNK: usize = 32 * 1024;
/// What the in-memory pipe between the WebSocket and the SSH side holds.
const PIPE: usize = 256 * 1024;

/// What a received message is to the byte stream.
pub enum Frame {
    Data(Bytes),
    Close,
    /// Ping, pong, text: not part of the stream.
    Other,
}

/// Returns the near end of an in-memory pipe, and the task (to spawn) that
/// moves its bytes to and from `ws`: outgoing bytes as binary messages made
/// by `binary`, incoming messages read by `frame`. The task ends, closing
/// the pipe, when either side ends; a slow reader holds the WebSocket back
/// through the pipe's bound, never buffering more.
pub fn pipe<W, M, E>(
    ws: W,
    binary: fn(Bytes) -> M,
    frame: fn(M) -> Frame,
) -> (DuplexStream, impl std::future::Future<Output = ()> + Send)
where
    W: Stream<Item = Result<M, E>> + Sink<M> + Send + Unpin + 'static,
    M: Send + 'static,
    E: Send + 'static,
{
    let (near, far) = tokio::io::duplex(PIPE);
    let pump = async move {
        let (mut sink, mut stream) = ws.split();
        let (mut r, mut w) = tokio::io::split(far);
        let inbound = async {
            while let Some(Ok(message)) = stream.next().await {
                match frame(message) {
                    Frame::Data(bytes) => {
                        if w.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    Frame::Close => break,
                    Frame::Other => {}
                }
            }
            let _ = w.shutdown().await;
        };
        let outbound = async {
            let mut buf = BytesMut::new();
            loop {
                buf.reserve(CHUNK);
                match r.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if sink.send(binary(buf.split().freeze())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sink.close().await;
        };
        tokio::select! {
            _ = inbound => {}
            _ = outbound => {}
        }
    };
    (near, pump)
}
