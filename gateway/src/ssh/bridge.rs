//! Per-channel message bridge between a user's channel (server side) and the
//! matching channel on the runner (client side), for job mode.
//!
//! Two independent directions, so that neither waits on the other:
//! - user → runner: data, stderr-data, EOF, close. Channel *requests* (pty,
//!   shell, exec, subsystem, env, window-change, signal) are forwarded by the
//!   connection handler itself, which waits for the runner's verdict and
//!   answers the user with it ([`Replies`]).
//! - runner → user: data, stderr-data, EOF, exit-status, exit-signal, close,
//!   and the runner's success/failure replies, handed to the handler.
//!
//! Flow control is end to end: each direction writes with the receiving
//! side's window (`data_bytes` waits for it), and only then gives the bytes
//! back to the sending side as window (`release_window`, from our russh patch
//! in `vendor/russh`). So a slow reader slows the writer, at most one window
//! per direction is held here, and the session loops never block on a full
//! channel queue (which would stall the other direction of the same channel).

use russh::server;
use russh::{client, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::mpsc;

/// Byte counters of one bridged channel, for the audit trail.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bytes {
    pub to_runner: u64,
    pub to_user: u64,
    pub exit_status: Option<u32>,
}

/// The runner's replies to forwarded channel requests, in order.
pub type Replies = mpsc::Receiver<bool>;

/// Runs both directions until the channel is closed on either side.
pub async fn run(
    user_rx: ChannelReadHalf,
    user_tx: ChannelWriteHalf<server::Msg>,
    user_handle: server::Handle,
    runner_rx: ChannelReadHalf,
    runner_tx: std::sync::Arc<ChannelWriteHalf<client::Msg>>,
    replies: mpsc::Sender<bool>,
) -> Bytes {
    let user_id = user_tx.id();
    let up = user_to_runner(user_rx, &user_tx, &runner_tx);
    let down = runner_to_user(runner_rx, &user_tx, &runner_tx, &user_handle, replies);
    // When one direction sees the channel close, the other has nothing left
    // to do: close both ends and stop.
    let mut bytes = Bytes::default();
    tokio::select! {
        n = up => {
            bytes.to_runner = n;
        }
        (n, status) = down => {
            bytes.to_user = n;
            bytes.exit_status = status;
        }
    }
    let _ = runner_tx.close().await;
    let _ = user_handle.close(user_id).await;
    bytes
}

async fn user_to_runner(
    mut rx: ChannelReadHalf,
    user: &ChannelWriteHalf<server::Msg>,
    tx: &ChannelWriteHalf<client::Msg>,
) -> u64 {
    let mut n = 0u64;
    while let Some(msg) = rx.wait().await {
        let sent = match msg {
            // Handed on, then given back to the user as window: the user can
            // never have more in flight here than one window.
            ChannelMsg::Data { data } => {
                let len = data.len();
                n += len as u64;
                match tx.data_bytes(data).await {
                    Ok(()) => user.release_window(len as u32).await,
                    Err(e) => Err(e),
                }
            }
            ChannelMsg::ExtendedData { data, ext } => {
                let len = data.len();
                n += len as u64;
                match tx.extended_data_bytes(ext, data).await {
                    Ok(()) => user.release_window(len as u32).await,
                    Err(e) => Err(e),
                }
            }
            ChannelMsg::Eof => tx.eof().await,
            ChannelMsg::Close => break,
            // Requests are forwarded by the handler, which answers them;
            // window bookkeeping is russh's.
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
    n
}

async fn runner_to_user(
    mut rx: ChannelReadHalf,
    tx: &ChannelWriteHalf<server::Msg>,
    runner: &ChannelWriteHalf<client::Msg>,
    handle: &server::Handle,
    replies: mpsc::Sender<bool>,
) -> (u64, Option<u32>) {
    let id = tx.id();
    let mut n = 0u64;
    let mut status = None;
    while let Some(msg) = rx.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => {
                let len = data.len();
                n += len as u64;
                match tx.data_bytes(data).await {
                    Ok(()) => runner.release_window(len as u32).await.map_err(|_| ()),
                    Err(_) => Err(()),
                }
            }
            ChannelMsg::ExtendedData { data, ext } => {
                let len = data.len();
                n += len as u64;
                match tx.extended_data_bytes(ext, data).await {
                    Ok(()) => runner.release_window(len as u32).await.map_err(|_| ()),
                    Err(_) => Err(()),
                }
            }
            ChannelMsg::Eof => handle.eof(id).await,
            ChannelMsg::ExitStatus { exit_status } => {
                status = Some(exit_status);
                handle.exit_status_request(id, exit_status).await
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                handle
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await
            }
            ChannelMsg::Success => replies.try_send(true).map_err(|_| ()),
            ChannelMsg::Failure => replies.try_send(false).map_err(|_| ()),
            ChannelMsg::Close => break,
            _ => Ok(()),
        };
        if sent.is_err() {
            break;
        }
    }
    (n, status)
}
