//! This replica's user sessions by session id: what an operator's
//! `admin kick` reaches. A session id names one user connection (in jump
//! mode, every job it forwards to); it is random, so ids from different
//! replicas do not collide, and it names the session's recording and its
//! audit records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// A fresh session id: 16 hex digits.
pub fn new_session_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Whether `s` has the form of a session id (so nothing else is looked up,
/// logged or sent to the other replicas).
pub fn is_session_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Sessions this replica holds. One entry per authenticated connection, so
/// its size is bounded by `ssh.max_connections`.
#[derive(Default)]
pub struct Directory {
    open: Mutex<HashMap<String, watch::Sender<Option<String>>>>,
}

impl Directory {
    fn open(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<Option<String>>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists session `id` until the returned guard drops; the receiver
    /// hears a kick's reason.
    pub fn enter(self: &Arc<Self>, id: &str) -> (Listed, watch::Receiver<Option<String>>) {
        let (tx, rx) = watch::channel(None);
        self.open().insert(id.to_string(), tx);
        (Listed(self.clone(), id.to_string()), rx)
    }

    /// Tells session `id` to close with `reason`; false if this replica
    /// does not hold it.
    pub fn kick(&self, id: &str, reason: &str) -> bool {
        match self.open().get(id) {
            Some(tx) => {
                tx.send_replace(Some(reason.to_string()));
                true
            }
            None => false,
        }
    }

    /// Whether this replica holds session `id`.
    pub fn holds(&self, id: &str) -> bool {
        self.open().contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.open().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A session's place in the [`Directory`]; gone with the connection.
pub struct Listed(Arc<Directory>, String);

impl Drop for Listed {
    fn drop(&mut self) {
        self.0.open().remove(&self.1);
    }
}

impl std::fmt::Debug for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Listed").field(&self.1).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kick_reaches_a_listed_session_only_while_listed() {
        let dir = Arc::new(Directory::default());
        let id = new_session_id();
        assert!(is_session_id(&id), "{id}");
        let (listed, rx) = dir.enter(&id);
        assert!(!dir.kick("0000000000000000", "no"));
        assert!(dir.kick(&id, "bye"));
        assert_eq!(rx.borrow().as_deref(), Some("bye"));
        drop(listed);
        assert!(dir.is_empty());
        assert!(!dir.kick(&id, "again"));
        assert!(!is_session_id("../../etc/passwd"));
        assert!(!is_session_id("ABCDEF0123456789"));
    }
}
