//! `GET /v1/jobs/{id}/tunnel`: a tunnel registration's SSH stream in a
//! WebSocket on the API listener, for runners where only HTTPS leaves the
//! network (DESIGN §10). The upgrade needs the job's token (or its OIDC
//! token); inside, the agent logs in to the same SSH server as on the SSH
//! port, as `tunnel+<id>` with the job token.

use axum::extract::ws::{Message, WebSocketUpgrade};

use super::*;

pub(super) async fn tunnel_websocket(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let job = job_id(&raw)?;
    let (reg, _) = authorized(&gw, &caller, job).await?;
    if !reg.tunnel {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("job {job} was not registered with --tunnel: the gateway dials its runner"),
        ));
    }
    let upgrade = upgrade.map_err(|e| {
        ApiError(
            StatusCode::UPGRADE_REQUIRED,
            format!("this is a WebSocket endpoint (the agent's tunnel): {e}"),
        )
    })?;
    tracing::info!(%peer, job = %job, "tunnel over a WebSocket");
    Ok(upgrade
        .max_message_size(crate::wsbridge::MAX_MESSAGE)
        .max_frame_size(crate::wsbridge::MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            let (stream, pump) = crate::wsbridge::pipe(socket, Message::Binary, |m| match m {
                Message::Binary(bytes) => crate::wsbridge::Frame::Data(bytes),
                Message::Close(_) => crate::wsbridge::Frame::Close,
                _ => crate::wsbridge::Frame::Other,
            });
            let tasks = gw.tasks.clone();
            tasks.spawn("tunnel websocket", pump);
            tasks.spawn(
                "tunnel websocket ssh",
                crate::ssh::server::serve_websocket(gw, stream, peer),
            );
        }))
}
