//! A channel's incoming messages with a look-ahead, for the byte paths
//! (`channel` in job mode, `splice` in jump mode).
//!
//! While a write waits (the other side's window is shut, or its socket is
//! full), later messages are read and kept, so a close is seen at once. The
//! data written before the close may still take [`CLOSE_DRAIN`] to go out;
//! then it is dropped. What is kept is bounded: data by the sender's window
//! (more is a protocol error), and every kind of message together by
//! [`MAX_KEPT`], past which the channel is given up (requests and EOFs take
//! no window, so only a count bounds them).

use std::collections::VecDeque;
use std::time::Duration;

use russh::{ChannelMsg, ChannelReadHalf};
use tokio::time::Instant;

/// How long data a user sent before closing a channel may take to reach a
/// side that has stopped reading; then it is dropped with the channel.
pub const CLOSE_DRAIN: Duration = Duration::from_secs(5);

/// Messages kept while one write waits (russh's own channel queue holds as
/// many again).
pub const MAX_KEPT: usize = 1024;

#[derive(Default)]
pub struct Inbox {
    later: VecDeque<ChannelMsg>,
    /// Set once the close was read: the drain's deadline.
    closing: Option<Instant>,
}

impl Inbox {
    /// The next message: a kept one first; `None` once the channel is gone.
    pub async fn next(&mut self, rx: &mut ChannelReadHalf) -> Option<ChannelMsg> {
        match self.later.pop_front() {
            Some(msg) => Some(msg),
            None if self.closing.is_some() => None,
            None => rx.wait().await,
        }
    }

    /// The next message if one is already here, without waiting.
    pub fn try_next(&mut self, rx: &mut ChannelReadHalf) -> Option<ChannelMsg> {
        match self.later.pop_front() {
            Some(msg) => Some(msg),
            None if self.closing.is_some() => None,
            None => rx.try_wait(),
        }
    }

    /// Puts back a message taken with [`Inbox::try_next`]: it is the next one.
    pub fn put_back(&mut self, msg: ChannelMsg) {
        self.later.push_front(msg);
    }

    /// Runs `write` while keeping what arrives meanwhile. `None` when the
    /// write was given up: the channel closed and the drain ran out, or the
    /// peer sent more than [`MAX_KEPT`] messages meanwhile.
    ///
    /// `write` is pinned by the caller: taken by value, it would be stored
    /// twice in this future (the argument, and the pinned copy polled), and
    /// the caller's future is sized for its largest await, this one.
    pub async fn meanwhile<F: std::future::Future>(
        &mut self,
        rx: &mut ChannelReadHalf,
        mut write: std::pin::Pin<&mut F>,
    ) -> Option<F::Output> {
        loop {
            let drained = async {
                match self.closing {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                out = write.as_mut() => return Some(out),
                msg = rx.wait(), if self.closing.is_none() => match msg {
                    Some(ChannelMsg::Close) | None => {
                        self.closing = Some(Instant::now() + CLOSE_DRAIN);
                        self.later.push_back(ChannelMsg::Close);
                    }
                    Some(_) if self.later.len() >= MAX_KEPT => {
                        self.give_up();
                        return None;
                    }
                    Some(msg) => self.later.push_back(msg),
                },
                _ = drained => {
                    self.give_up();
                    return None;
                }
            }
        }
    }

    /// Drops what is kept; the next message is the close.
    fn give_up(&mut self) {
        self.later.clear();
        self.later.push_back(ChannelMsg::Close);
        self.closing.get_or_insert_with(Instant::now);
    }
}
