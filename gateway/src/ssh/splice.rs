//! Jump mode's byte path: a user's `direct-tcpip` channel spliced with a TCP
//! connection to the runner.
//!
//! No buffer is held while a session is idle: channel data arrives as the
//! packets russh already holds and is written to TCP as is; TCP data is read
//! only once the socket is readable, into a buffer allocated for that read.
//! Flow control is end to end: the user's window is given back only after
//! the bytes were written to the runner (our russh patch's
//! `release_window`), so at most one window is ever in flight per channel.

use bytes::BytesMut;
use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::AsyncWriteExt;

use crate::ssh::channel::{Bytes, Usage};
use crate::ssh::inbox::Inbox;

/// The most read from TCP at once (one SSH packet's worth of payload).
const READ_CHUNK: usize = 32 * 1024;

/// Runs until the user's side is gone (the runner's EOF alone does not end
/// it: the user may still be sending); adds what it moved to `usage` before
/// it closes the channel.
pub async fn run(
    channel: Channel<Msg>,
    tcp: tokio::net::TcpStream,
    handle: russh::server::Handle,
    usage: &Usage,
) -> Bytes {
    let (mut rx, tx) = channel.split();
    let (tcp_r, mut tcp_w) = tcp.into_split();
    let up = std::sync::atomic::AtomicU64::new(0);
    let down = std::sync::atomic::AtomicU64::new(0);
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
                    up.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                    if tx.release_window(len as u32).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::Eof => {
                    let _ = tcp_w.shutdown().await;
                }
                ChannelMsg::Close => break,
                msg => {
                    // A TCP forward takes no requests; each that wants a
                    // reply gets a no (russh leaves the answers to us).
                    if crate::ssh::channel::wants_reply(&msg) {
                        let _ = handle.channel_reply(tx.id(), false).await;
                    }
                }
            }
        }
        let _ = tcp_w.shutdown().await;
    };
    let to_user = async {
        loop {
            if tcp_r.readable().await.is_err() {
                break;
            }
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            match tcp_r.try_read_buf(&mut buf) {
                Ok(0) => {
                    let _ = tx.eof().await;
                    break;
                }
                Ok(k) => {
                    down.fetch_add(k as u64, std::sync::atomic::Ordering::Relaxed);
                    if tx.data_bytes(buf.freeze()).await.is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        }
    };
    {
        let mut to_runner = std::pin::pin!(to_runner);
        tokio::select! {
            // The user's side is gone: stop reading the runner too.
            _ = &mut to_runner => {}
            // The runner finished sending; the user may still send.
            _ = to_user => to_runner.await,
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
