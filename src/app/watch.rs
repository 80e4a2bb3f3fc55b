//! Long-lived tasks and how their end is judged: an error, a panic, or an end nobody asked
//! for fails the node (readiness off, exit 1); an end during the shutdown is expected.

use std::future::Future;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Spawns a long-lived task (on `runtime`, else the current one). Its end is logged once;
/// an error, a panic, or an end before `ending` was cancelled (nothing asked it to stop)
/// marks the node failed, which turns readiness off and makes `run` return an error.
pub(super) fn spawn<F>(
    tasks: &TaskTracker,
    watch: &TaskWatch,
    name: &'static str,
    task: F,
    runtime: Option<&Handle>,
) where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let task = watch.watched(name, task);
    match runtime {
        Some(handle) => drop(tasks.spawn_on(task, handle)),
        None => drop(tasks.spawn(task)),
    }
}

/// How the node learns that a long-lived task ended: `failed` is cancelled when one fails;
/// `ending` is cancelled by the shutdown sequence before it stops the tasks, so an end after
/// it is expected and an end before it is a failure.
#[derive(Clone, Default)]
pub(super) struct TaskWatch {
    pub(super) failed: CancellationToken,
    pub(super) ending: CancellationToken,
}

impl TaskWatch {
    /// `task`, wrapped: catches its panic (a panicking task must not leave a node that looks
    /// healthy and delivers nothing) and reports how it ended.
    fn watched<F>(&self, name: &'static str, task: F) -> impl Future<Output = ()> + Send + 'static
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        use futures::FutureExt as _;
        let watch = self.clone();
        async move {
            let outcome = std::panic::AssertUnwindSafe(task).catch_unwind().await;
            let failure = match outcome {
                Ok(Ok(())) if watch.ending.is_cancelled() => {
                    tracing::info!(task = name, "stopped");
                    return;
                }
                Ok(Ok(())) => "ended before shutdown".to_owned(),
                Ok(Err(e)) => format!("{e:#}"),
                // The panic hook (main.rs) logged its message and location.
                Err(_) => "panicked".to_owned(),
            };
            tracing::error!(task = name, error = failure, "failed");
            watch.failed.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn outcome<F>(watch: &TaskWatch, task: F) -> bool
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        tokio::spawn(watch.watched("test", task)).await.unwrap();
        watch.failed.is_cancelled()
    }

    #[tokio::test]
    async fn a_panicking_task_fails_the_node() {
        let watch = TaskWatch::default();
        let panics = async { panic!("recovery lost its waiter") };
        assert!(outcome(&watch, panics).await);
    }

    #[tokio::test]
    async fn a_task_that_ends_before_shutdown_fails_the_node() {
        assert!(outcome(&TaskWatch::default(), async { Ok(()) }).await);
        let errs = async { Err(anyhow::anyhow!("bus gone")) };
        assert!(outcome(&TaskWatch::default(), errs).await);
    }

    #[tokio::test]
    async fn a_task_asked_to_stop_ends_cleanly() {
        let watch = TaskWatch::default();
        watch.ending.cancel();
        assert!(!outcome(&watch, async { Ok(()) }).await);
    }
}
