//! A one-way flag a task can wait on: raised rarely (KILL, a drain), checked on every wake-up
//! of a client's relay loop. A CancellationToken takes a mutex on each such check; a waiting
//! `Flag` costs one atomic load once its waker is registered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// A flag that, once raised, stays raised and wakes whoever waits for it.
#[derive(Debug, Default)]
pub struct Flag {
    raised: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Flag {
    fn wakers(&self) -> MutexGuard<'_, Vec<Waker>> {
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the flag and wakes every waiter.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        for w in std::mem::take(&mut *self.wakers()) {
            w.wake();
        }
    }

    /// True once raised.
    #[inline]
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// Resolves once the flag is raised.
    pub fn wait(&self) -> Wait<'_> {
        Wait { flag: self, registered: None }
    }
}

/// The future of [`Flag::wait`].
#[derive(Debug)]
pub struct Wait<'a> {
    flag: &'a Flag,
    /// The waker last registered with the flag: polls with the same one skip the lock.
    registered: Option<Waker>,
}

impl std::future::Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.is_raised() {
            return Poll::Ready(());
        }
        if self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        {
            let mut wakers = self.flag.wakers();
            if let Some(old) = &self.registered {
                wakers.retain(|w| !w.will_wake(old));
            }
            wakers.push(cx.waker().clone());
        }
        self.registered = Some(cx.waker().clone());
        // A raise between the first check and the registration found no waker to wake.
        if self.flag.is_raised() { Poll::Ready(()) } else { Poll::Pending }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(old) = &self.registered {
            self.flag.wakers().retain(|w| !w.will_wake(old));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiter_wakes_when_the_flag_is_raised() {
        let flag = Arc::new(Flag::default());
        let waiting = tokio::spawn({
            let flag = flag.clone();
            async move { flag.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        flag.raise();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("woken").expect("joined");
    }

    #[tokio::test]
    async fn a_raised_flag_resolves_at_once_and_stays_raised() {
        let flag = Flag::default();
        flag.raise();
        flag.wait().await;
        flag.wait().await;
        assert!(flag.is_raised());
    }

    #[tokio::test]
    async fn every_waiter_is_woken_and_dropped_waiters_leave_no_waker() {
        let flag = Arc::new(Flag::default());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let flag = flag.clone();
                tokio::spawn(async move { flag.wait().await })
            })
            .collect();
        {
            let mut gone = std::pin::pin!(flag.wait());
            let _ = futures_poll_once(gone.as_mut()).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(flag.wakers().len(), 3, "the dropped waiter unregistered");
        flag.raise();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w).await.expect("woken").expect("joined");
        }
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut f).poll(cx))).await
    }
}
