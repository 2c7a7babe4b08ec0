//! The SSH side: the accept loop and limits (`server`), the per-connection
//! handler (`handler`), the client to runners (`upstream`) and the channel
//! bridge between them (`bridge`).

pub mod bridge;
pub mod handler;
pub mod server;
pub mod upstream;
