//! Connection threads: each accepted SSH connection lives on one of a few
//! single-threaded runtimes, one per core, with every task it spawns (the
//! russh session, the channel splices, the job-mode connection to the
//! runner). The control plane (the API, the store, the sweepers) stays on
//! the main multi-threaded runtime.
//!
//! Why: a relayed packet goes from the session task to the splice task and
//! on to a socket, and back as a window release. On a work-stealing runtime
//! the two tasks of one connection run on different workers, so each packet
//! wakes a parked thread (`futex`) and crosses cores. With every task of a
//! connection on one thread the handoff is a local queue push. Measured on
//! the jump relay (docs/performance.md, "One thread per connection"): relay
//! CPU per GiB 25–30 % lower, the same as the whole gateway on one worker.
//! The cost is that a connection cannot move to an idle core: connections
//! are placed on the thread with the fewest open ones, and a thread busy with
//! one bulk transfer shares its core with the others placed there (as an
//! OpenSSH `sshd` child shares a core with whatever else runs there).
//!
//! A thread runs until its listener stopped, its last connection ended and
//! the gateway's tasks are done (those a connection spawned run here too).

use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

/// One connection thread: its runtime, and the connections on it (the
/// tracker's count is the thread's load).
struct Shard {
    handle: Handle,
    /// Closed when the listener stops; the thread ends once it is empty.
    tracker: TaskTracker,
}

pub struct Shards {
    shards: Vec<Shard>,
}

impl Shards {
    /// `n` connection threads. A thread that cannot be started is logged
    /// and left out; with none, connections stay on the calling runtime.
    pub fn start(n: usize, tasks: &crate::tasks::Tasks) -> Shards {
        let mut shards = Vec::with_capacity(n);
        for i in 0..n {
            match start_one(i, tasks) {
                Ok(shard) => shards.push(shard),
                Err(e) => tracing::warn!("cannot start SSH connection thread {i}: {e}"),
            }
        }
        Shards { shards }
    }

    /// Spawns `task` on the thread with the fewest open connections,
    /// tracked by `tasks` as well; on the current runtime when there is no
    /// thread.
    pub fn spawn<F>(&self, tasks: &crate::tasks::Tasks, name: &'static str, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match self.shards.iter().min_by_key(|s| s.tracker.len()) {
            // Counted from here, so the next placement already sees it.
            Some(shard) => tasks.spawn_on(name, shard.tracker.track_future(task), &shard.handle),
            None => tasks.spawn(name, task),
        }
    }

    /// Open connections per thread (for tests and logs).
    pub fn open(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.tracker.len()).collect()
    }
}

impl Drop for Shards {
    /// The listener stopped: each thread ends after its last connection.
    fn drop(&mut self) {
        for shard in &self.shards {
            shard.tracker.close();
        }
    }
}

fn start_one(i: usize, tasks: &crate::tasks::Tasks) -> std::io::Result<Shard> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let tracker = TaskTracker::new();
    let until_done = tracker.clone();
    // The connections' own tasks (channels, recordings, disconnects) run on
    // this runtime too and may outlive their connection: dropping the runtime
    // would cancel them, so the thread also waits for every gateway task
    // (`Tasks::drain` closes that set when the gateway stops).
    let all_ended = tasks.all_ended();
    std::thread::Builder::new()
        .name(format!("ssh-conn-{i}"))
        .spawn(move || {
            runtime.block_on(async move {
                until_done.wait().await;
                all_ended.await;
            })
        })?;
    Ok(Shard { handle, tracker })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_emptiest_thread_and_run_there() {
        let tasks = crate::tasks::Tasks::default();
        let shards = Shards::start(2, &tasks);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut releases = Vec::new();
        for _ in 0..4 {
            let (release, held) = tokio::sync::oneshot::channel::<()>();
            releases.push(release);
            let tx = tx.clone();
            shards.spawn(&tasks, "test", async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = tx.send(name);
                let _ = held.await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(rx.recv().await.flatten().unwrap_or_default());
        }
        names.sort();
        assert_eq!(
            names,
            ["ssh-conn-0", "ssh-conn-0", "ssh-conn-1", "ssh-conn-1"]
        );
        assert_eq!(shards.open(), [2, 2]);
        drop(releases);
        assert!(tasks.drain(std::time::Duration::from_secs(60)).await);
        assert_eq!(shards.open(), [0, 0]);
    }

    /// A task a connection spawned (a channel finishing its recording, a
    /// disconnect message) runs to its end on the connection's thread even
    /// when the connection ended first and the listener has stopped: the
    /// thread's runtime is not dropped under it.
    #[tokio::test]
    async fn a_connections_tasks_outlive_it_on_its_thread() {
        use std::time::Duration;
        let tasks = crate::tasks::Tasks::default();
        let shards = Shards::start(1, &tasks);
        let (go, went) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = tokio::sync::oneshot::channel::<&'static str>();
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        let child_tasks = tasks.clone();
        shards.spawn(&tasks, "connection", async move {
            child_tasks.spawn("after the connection", async move {
                let _ = went.await;
                let _ = done_tx.send("finished");
            });
            let _ = ended.await;
        });
        drop(end);
        for _ in 0..500 {
            if shards.open() == [0] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(shards.open(), [0], "the connection ended");
        // The listener stops; give a thread that would end now the time to.
        drop(shards);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = go.send(());
        let finished = tokio::time::timeout(Duration::from_secs(10), done).await;
        assert_eq!(
            finished.expect("the task answers").ok(),
            Some("finished"),
            "the task was dropped with its thread's runtime"
        );
        assert!(tasks.drain(Duration::from_secs(10)).await);
    }
}
