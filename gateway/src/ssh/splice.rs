//! One SSH channel spliced with a byte stream: jump mode's `direct-tcpip`
//! with a TCP connection to the runner, a tunnel channel with the in-memory
//! pipe job mode's SSH client runs over, and on the agent's side a tunnel
//! channel with the runner's local sshd.
//!
//! No buffer is held while a session is idle: channel data arrives as the
//! packets russh already holds and is written to TCP as is; TCP data is read
//! only once the socket is readable, into a buffer allocated for that read.
//! Flow control is end to end: the user's window is given back only after
//! the bytes were written to the runner (our russh patch's
//! `release_window`), so at most one window is ever in flight per channel.

use bytes::BytesMut;
use russh::{Channel, ChannelId, ChannelMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ssh::channel::{Bytes, Usage};
use crate::ssh::inbox::Inbox;

/// The most read from TCP at once (one SSH packet's worth of payload).
const READ_CHUNK: usize = 32 * 1024;

/// Runs until the user's side is gone (the runner's EOF alone does not end
/// it: the user may still be sending); adds what it moved to `usage` before
/// it closes the channel.
/// The far side's reads, one chunk at a time (`None` at its end).
pub trait ReadChunk: Send {
    fn read_chunk(
        &mut self,
    ) -> impl std::future::Future<Output = std::io::Result<Option<bytes::Bytes>>> + Send;
}

/// A TCP socket allocates its buffer only once data is there, so an idle
/// splice holds none.
impl ReadChunk for tokio::net::tcp::OwnedReadHalf {
    async fn read_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        loop {
            self.readable().await?;
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            match self.try_read_buf(&mut buf) {
                Ok(0) => return Ok(None),
                Ok(_) => return Ok(Some(buf.freeze())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Any other reader (an in-memory pipe): one chunk buffer per read.
pub struct Reads<R>(pub R);

impl<R: AsyncRead + Unpin + Send> ReadChunk for Reads<R> {
    async fn read_chunk(&mut self) -> std::io::Result<Option<bytes::Bytes>> {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        match self.0.read_buf(&mut buf).await? {
            0 => Ok(None),
            _ => Ok(Some(buf.freeze())),
        }
    }
}

/// Splices `channel` with the far side (`far_r`, `far_w`). Channel requests
/// that want a reply are answered no through `replies` (a server handle;
/// `None` on the client side, where the peer sends none worth answering).
pub async fn run<S, R, W>(
    channel: Channel<S>,
    (mut tcp_r, mut tcp_w): (R, W),
    replies: Option<russh::server::Handle>,
    usage: &Usage,
) -> Bytes
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    R: ReadChunk,
    W: AsyncWrite + Unpin + Send,
{
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let (mut rx, tx) = channel.split();
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let (got_eof, sent_eof) = (AtomicBool::new(false), AtomicBool::new(false));
    let to_runner = async {
        // A close is seen even while a write to a runner that stopped
        // reading waits; what was sent before it drains for a while.
        let mut inbox = Inbox::default();
        while let Some(msg) = inbox.next(&mut rx).await {
            match msg {
                ChannelMsg::Data { data } => {
                    let len = data.len();
                    match inbox.meanwhile(&mut rx, tcp_w.write_all(&data)).await {
                        Some(Ok(())) => {}
                        Some(Err(_)) => break,
                        None => continue,
                    }
                    up.fetch_add(len as u64, Relaxed);
                    usage.count_to_runner(len as u64);
                    if tx.release_window(len as u32).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::Eof => {
                    let _ = tcp_w.shutdown().await;
                    got_eof.store(true, Relaxed);
                    // Both ways are done: nothing more to wait for (when
                    // both ends are splices, neither would close first).
                    if sent_eof.load(Relaxed) {
                        break;
                    }
                }
                ChannelMsg::Close => break,
                msg => {
                    // A TCP forward takes no requests; each that wants a
                    // reply gets a no (russh leaves the answers to us).
                    if let Some(handle) = replies.as_ref() {
                        if crate::ssh::channel::wants_reply(&msg) {
                            let _ = handle.channel_reply(tx.id(), false).await;
                        }
                    }
                }
            }
        }
        let _ = tcp_w.shutdown().await;
    };
    let to_user = async {
        loop {
            match tcp_r.read_chunk().await {
                Ok(None) => {
                    let _ = tx.eof().await;
                    sent_eof.store(true, Relaxed);
                    break;
                }
                Ok(Some(chunk)) => {
                    down.fetch_add(chunk.len() as u64, Relaxed);
                    usage.count_to_user(chunk.len() as u64);
                    if tx.data_bytes(chunk).await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    };
    {
        let mut to_runner = std::pin::pin!(to_runner);
        tokio::select! {
            // The user's side is gone: stop reading the runner too.
            _ = &mut to_runner => {}
            // The runner finished sending; the user may still send,
            // unless they already said they are done.
            _ = to_user => if !got_eof.load(Relaxed) { to_runner.await },
        }
    }
    let moved = Bytes {
        to_runner: up.into_inner(),
        to_user: down.into_inner(),
        exit_status: None,
    };
    usage.add(&moved);
    let _ = tx.close().await;
    moved
}
