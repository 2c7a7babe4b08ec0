//! One way to start and to stop the gateway's tasks: every task is spawned
//! on one [`TaskTracker`], and one [`CancellationToken`] tells them all that
//! the gateway is stopping (the shape of mini-redis' shutdown, with
//! tokio-util's two types instead of hand-rolled channels).
//!
//! - Listeners stop accepting when the token fires.
//! - Each SSH connection then gets its grace period and a disconnect
//!   message (`ssh::server`); hold and sweep tasks stop at once, so a
//!   restart neither ends a held job nor loses its deadline (it resumes).
//! - [`Tasks::drain`] waits for the tracker to empty, so [`crate::run`]
//!   returns only when no task holds the gateway's state (the store is
//!   closed when the last `Arc<Gateway>` goes).
//!
//! A task that panics is logged at error level with its name and counted in
//! `ci_gateway_task_panics_total`: one connection's bug ends that connection,
//! not the gateway, and is not silent. The gateway's own core tasks (the
//! listeners, the sweepers) are watched by `run`, which stops the process
//! with an error when one of them ends early.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Tasks {
    stop: CancellationToken,
    tracker: TaskTracker,
    panics: Counter,
}

impl Tasks {
    /// Tasks whose panics count in `panics`.
    pub fn new(panics: Counter) -> Tasks {
        Tasks {
            panics,
            ..Default::default()
        }
    }

    /// Runs `task` on the tracker; a panic in it is logged as `name`'s.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(self.logging_panics(name, task));
    }

    /// `task`, with a panic in it logged as `name`'s and counted.
    fn logging_panics<F>(&self, name: &'static str, task: F) -> impl Future<Output = ()> + use<F>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let panics = self.panics.clone();
        // Combinators, not an `async` block: a block keeps `task` twice (the
        // value it captured and the future it awaits), and every task of the
        // gateway was twice its size (a job-mode channel's 14 KiB, not 7).
        AssertUnwindSafe(task).catch_unwind().map(move |ended| {
            if let Err(panic) = ended {
                panics.inc();
                tracing::error!(task = name, "task panicked: {}", panic_message(&panic));
            }
        })
    }

    /// [`Tasks::spawn`] on the runtime of `handle` (a connection thread's).
    pub fn spawn_on<F>(&self, name: &'static str, task: F, handle: &tokio::runtime::Handle)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker
            .spawn_on(self.logging_panics(name, task), handle);
    }

    /// Runs `task` on the tracker and hands back its handle, for the core
    /// tasks whose end (or panic) [`crate::run`] must see.
    pub fn spawn_core<F, T>(&self, task: F) -> tokio::task::JoinHandle<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// `task`, cut short when the gateway stops (holds, sweepers: work the
    /// next start takes up again).
    pub fn until_stopped<F>(&self, task: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Boxed and selected, not an `async` block that selects: that would
        // keep `task` twice, as `logging_panics` once did (a held job's
        // hold task is one of these).
        futures::future::select(Box::pin(task), Box::pin(self.stopping())).map(|_| ())
    }

    /// Tells every task that the gateway is stopping.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Resolves once [`Tasks::stop`] was called (at once if it was).
    pub fn stopping(&self) -> WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves once [`Tasks::drain`] closed the set and every task ended
    /// (what a connection thread waits for before dropping its runtime).
    pub fn all_ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let tracker = self.tracker.clone();
        async move { tracker.wait().await }
    }

    /// Tasks still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Takes no new tasks and waits up to `within` for the running ones to
    /// end. Returns whether they all did.
    pub async fn drain(&self, within: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// The message a panic carried, when it was a string (nearly always).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_counted_and_drain_waits_for_every_task() {
        let panics = Counter::default();
        let tasks = Tasks::new(panics.clone());
        tasks.spawn("boom", async { panic!("on purpose") });
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let stopping = tasks.stopping();
        tasks.spawn("waits for stop", async move {
            stopping.await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = done_tx.send(());
        });
        assert!(
            !tasks.drain(Duration::from_millis(100)).await,
            "a task that waits for stop is still running"
        );
        tasks.stop();
        assert!(tasks.drain(Duration::from_secs(5)).await);
        assert!(done_rx.await.is_ok(), "the task ran to its end");
        assert_eq!(panics.get(), 1);
        assert_eq!(tasks.running(), 0);
    }

    /// A task that holds 4 KiB across an await: what a wrapper around it
    /// should add a few bytes to, not its own size again.
    fn a_4_kib_task() -> impl Future<Output = ()> + Send + 'static {
        let big = [0u8; 4096];
        async move {
            tokio::task::yield_now().await;
            std::hint::black_box(&big);
        }
    }

    #[test]
    fn a_task_is_not_stored_twice() {
        let tasks = Tasks::default();
        let inner = std::mem::size_of_val(&a_4_kib_task());
        let spawned = std::mem::size_of_val(&tasks.logging_panics("sized", a_4_kib_task()));
        assert!(
            spawned < inner + 64,
            "{spawned} bytes to spawn a {inner}-byte task"
        );
        // Until stopped, the task is boxed: the wrapper holds pointers.
        let held = std::mem::size_of_val(&tasks.until_stopped(a_4_kib_task()));
        assert!(held < inner, "{held} bytes to hold a {inner}-byte task");
    }

    #[tokio::test]
    async fn a_task_until_stopped_ends_at_the_stop_or_by_itself() {
        let tasks = Tasks::default();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let finishes = tokio::spawn(tasks.until_stopped(async move {
            let _ = done_rx.await;
        }));
        let forever = tokio::spawn(tasks.until_stopped(std::future::pending()));
        let _ = done_tx.send(());
        tokio::time::timeout(Duration::from_secs(5), finishes)
            .await
            .expect("a task that ends ends the wrapper")
            .expect("join");
        assert!(!forever.is_finished());
        tasks.stop();
        tokio::time::timeout(Duration::from_secs(5), forever)
            .await
            .expect("the stop ends a task that would run forever")
            .expect("join");
    }

    #[test]
    fn panic_messages_of_both_kinds_are_read() {
        let s: Box<dyn std::any::Any + Send> = Box::new("static");
        let owned: Box<dyn std::any::Any + Send> = Box::new(String::from("owned"));
        let other: Box<dyn std::any::Any + Send> = Box::new(7u8);
        assert_eq!(panic_message(&*s), "static");
        assert_eq!(panic_message(&*owned), "owned");
        assert_eq!(panic_message(&*other), "(not a string)");
    }
}
