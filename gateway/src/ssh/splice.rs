//! One SSH channel spliced with a byte stream: jump mode's `direct-tcpip`
//! with a TCP connection to the runner, a tunnel channel with the in-memory
//! pipe job mode's SSH client runs over, and on the agent's side a tunnel
//! channel with the runner's local sshd.
//!
//! No buffer is held while a session is idle: channel data arrives as the
//! packets russh already holds and is written to TCP as is, the packets
//! already queued together in one `writev` (one window release for them
//! all); TCP data is read only once the socket is readable, into a buffer
//! allocated for that read.
//! Flow control is end to end: the user's window is given back only after
//! the bytes were written to the runner (our russh patch's
//! `release_window`), so at most one window is ever in flight per channel.

use std::collections::VecDeque;

use bytes::BytesMut;
use russh::{Channel, ChannelId, ChannelMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ssh::channel::{Bytes, Usage};
use crate::ssh::inbox::Inbox;

/// The most read from TCP at once: two SSH packets' worth of payload, so a
/// full socket costs one read and one wakeup of the session per 64 KiB.
const READ_CHUNK: usize = 64 * 1024;

/// The most data messages written to the far side in one `writev`.
const MAX_BATCH: usize = 16;

/// Past this many bytes no more queued data messages join a batch.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Writes every chunk of `chunks`, as many per `writev` as it takes, and
/// leaves `chunks` empty (also on an error: the channel is then given up).
async fn write_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut VecDeque<bytes::Bytes>,
) -> std::io::Result<()> {
    use bytes::Buf;
    while !chunks.is_empty() {
        let written = {
            let mut iov = [std::io::IoSlice::new(&[]); MAX_BATCH];
            let n = chunks.len().min(MAX_BATCH);
            for (slot, chunk) in iov.iter_mut().zip(chunks.iter()) {
                *slot = std::io::IoSlice::new(chunk);
            }
            w.write_vectored(&iov[..n]).await
        };
        let mut written = match written {
            Ok(0) => Err(std::io::ErrorKind::WriteZero.into()),
            other => other,
        }
        .inspect_err(|_| chunks.clear())?;
        while written > 0 {
            let Some(front) = chunks.front_mut() else {
                break;
            };
            if front.len() <= written {
                written -= front.len();
                chunks.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

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
        use std::task::Poll;
        loop {
            self.readable().await?;
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            // Read through `poll_read`, not `try_read_buf`: a short read
            // clears the readiness there, so a socket this read emptied costs
            // no second `recv` that only says it would block.
            let read = std::future::poll_fn(|cx| {
                Poll::Ready(tokio_util::io::poll_read_buf(
                    std::pin::Pin::new(&mut *self),
                    cx,
                    &mut buf,
                ))
            })
            .await;
            match read {
                // The socket was empty after all, or this task used up its
                // turn (tokio's cooperative budget: then the readiness stays
                // set, and looping here at once would spin): give the turn
                // back, drop the buffer, and wait again.
                Poll::Pending => {
                    drop(buf);
                    tokio::task::yield_now().await;
                }
                Poll::Ready(Ok(0)) => return Ok(None),
                Poll::Ready(Ok(_)) => return Ok(Some(buf.freeze())),
                Poll::Ready(Err(e)) => return Err(e),
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
        let mut batch = VecDeque::new();
        while let Some(msg) = inbox.next(&mut rx).await {
            match msg {
                ChannelMsg::Data { data } => {
                    // What is already queued behind it goes in the same
                    // `writev` and the same window release.
                    let mut len = data.len();
                    batch.push_back(data);
                    while batch.len() < MAX_BATCH && len < MAX_BATCH_BYTES {
                        match inbox.try_next(&mut rx) {
                            Some(ChannelMsg::Data { data }) => {
                                len += data.len();
                                batch.push_back(data);
                            }
                            Some(other) => {
                                inbox.put_back(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    let written = {
                        let write = std::pin::pin!(write_chunks(&mut tcp_w, &mut batch));
                        inbox.meanwhile(&mut rx, write).await
                    };
                    match written {
                        Some(Ok(())) => {}
                        Some(Err(_)) => break,
                        None => {
                            batch.clear();
                            continue;
                        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Takes at most `step` bytes per write, vectored, and counts the calls.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            let mut left = self.step;
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(left);
                self.out.extend_from_slice(&b[..k]);
                (left, n) = (left - k, n + k);
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn chunks(sizes: &[usize]) -> (VecDeque<bytes::Bytes>, Vec<u8>) {
        let mut all = Vec::new();
        let mut q = VecDeque::new();
        for (i, &n) in sizes.iter().enumerate() {
            let c: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            all.extend_from_slice(&c);
            q.push_back(c.into());
        }
        (q, all)
    }

    #[tokio::test]
    async fn partial_vectored_writes_lose_and_repeat_nothing() {
        // More chunks than one writev takes, writes that end inside a chunk
        // and exactly at a chunk's end, and an empty chunk.
        for step in [1, 5, 7, 100, 1 << 20] {
            let (mut q, all) = chunks(&[3, 0, 10, 7, 1, 64, 5, 9, 2, 2, 2, 2, 2, 2, 2, 2, 40, 11]);
            let mut w = Trickle {
                out: vec![],
                step,
                calls: 0,
            };
            write_chunks(&mut w, &mut q).await.unwrap();
            assert!(q.is_empty());
            assert_eq!(w.out, all, "step {step}");
            if step == 1 << 20 {
                // 18 chunks: one writev of 16, one of the last 2.
                assert_eq!(w.calls, 2);
            }
        }
    }

    /// A socket with data to read, met when the reading task has used up
    /// its cooperative budget: tokio's `poll_read` then says Pending while
    /// the readiness stays set. The read must give its turn back, not spin
    /// (it did: the runtime's worker at 100 % and the transfer stalled).
    #[test]
    fn a_read_after_the_budget_is_spent_gives_the_turn_back() {
        use tokio::io::AsyncWriteExt as _;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (done, result) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (conn, _) = listener.accept().await.unwrap();
            peer.write_all(b"hello").await.unwrap();
            let (mut r, _w) = conn.into_split();
            r.readable().await.unwrap();
            std::future::poll_fn(|cx| {
                while let Poll::Ready(r) = tokio::task::coop::poll_proceed(cx) {
                    r.made_progress();
                }
                Poll::Ready(())
            })
            .await;
            assert!(!tokio::task::coop::has_budget_remaining());
            let _ = done.send(r.read_chunk().await.unwrap());
        });
        // Not a timing assertion: a guard so that a spin fails the test
        // instead of hanging it.
        let got = result.recv_timeout(std::time::Duration::from_secs(60));
        rt.shutdown_background();
        let got = got.expect("read_chunk spun on a spent budget");
        assert_eq!(got.as_deref(), Some(&b"hello"[..]));
    }

    #[tokio::test]
    async fn a_write_of_nothing_is_an_error_and_drops_the_batch() {
        let (mut q, _) = chunks(&[4, 4]);
        let mut w = Trickle {
            out: vec![],
            step: 0,
            calls: 0,
        };
        let err = write_chunks(&mut w, &mut q).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WriteZero);
        assert!(q.is_empty());
    }
}
