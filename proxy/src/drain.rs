//! Graceful drain: one signal that every listener and connection watches,
//! and a count of the work still running (connections, upgraded streams).
//!
//! On drain, listeners stop accepting, HTTP/1.1 connections close after
//! their current response (`Connection: close`), HTTP/2 connections send
//! GOAWAY, and [`Drain::wait`] returns once nothing is left or the drain
//! window has passed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
    /// The signal's value for [`Drain::is_draining`], read on every
    /// response: a load, where the watch takes and releases a lock.
    draining: AtomicBool,
    active: AtomicUsize,
    idle: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            signal: watch::channel(false).0,
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }
}

/// Held by a connection (or an upgraded stream) for as long as it runs.
#[derive(Debug)]
pub struct Tracked(Arc<Drain>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Starts draining (idempotent).
    pub fn start(&self) {
        self.draining.store(true, Ordering::Release);
        self.signal.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A receiver that sees the drain start.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    /// Resolves when draining starts (at once if it has).
    pub async fn started(&self) {
        let mut rx = self.signal.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn track(self: &Arc<Self>) -> Tracked {
        self.active.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Waits until nothing tracked is left, or `window` has passed. True
    /// when everything finished.
    pub async fn wait(&self, window: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let idle = self.idle.notified();
            if self.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.active() == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_returns_when_the_last_tracked_work_ends() {
        let d = Arc::new(Drain::default());
        let t = d.track();
        let d2 = d.clone();
        let h = tokio::spawn(async move { d2.wait(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!h.is_finished());
        drop(t);
        assert!(h.await.expect("join"));
        let _t = d.track();
        assert!(!d.wait(Duration::from_millis(20)).await);
    }
}
