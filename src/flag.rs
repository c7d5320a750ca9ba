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
    wakers: Mutex<Wakers>,
}

/// The waiters' wakers, each in its own slot: a waiter replaces or removes exactly its own,
/// in constant time however many wait (every session waits on the broker's stop flag).
#[derive(Debug, Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Wakers {
    fn insert(&mut self, w: Waker) -> usize {
        match self.free.pop() {
            Some(i) => {
                if let Some(slot) = self.slots.get_mut(i) {
                    *slot = Some(w);
                }
                i
            }
            None => {
                self.slots.push(Some(w));
                self.slots.len() - 1
            }
        }
    }

    /// Frees slot `i`; a slot emptied by a raise meanwhile is left alone.
    fn remove(&mut self, i: usize) {
        if let Some(slot) = self.slots.get_mut(i)
            && slot.take().is_some()
        {
            self.free.push(i);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}

impl Flag {
    fn wakers(&self) -> MutexGuard<'_, Wakers> {
        self.wakers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the flag and wakes every waiter.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::SeqCst);
        let taken = std::mem::take(&mut *self.wakers());
        for w in taken.slots.into_iter().flatten() {
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
    /// The waker last registered with the flag and its slot: polls with the same waker skip
    /// the lock.
    registered: Option<(usize, Waker)>,
}

impl std::future::Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.is_raised() {
            return Poll::Ready(());
        }
        if self.registered.as_ref().is_some_and(|(_, w)| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let slot = {
            let mut wakers = self.flag.wakers();
            if let Some((old, _)) = self.registered.take() {
                wakers.remove(old);
            }
            wakers.insert(cx.waker().clone())
        };
        self.registered = Some((slot, cx.waker().clone()));
        // A raise between the first check and the registration found no waker to wake.
        if self.flag.is_raised() { Poll::Ready(()) } else { Poll::Pending }
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some((slot, _)) = self.registered.take() {
            self.flag.wakers().remove(slot);
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

    #[tokio::test]
    async fn two_waits_of_one_task_keep_their_own_wakers() {
        let flag = Arc::new(Flag::default());
        let task = tokio::spawn({
            let flag = flag.clone();
            async move {
                let mut first = std::pin::pin!(flag.wait());
                {
                    let mut second = std::pin::pin!(flag.wait());
                    let _ = futures_poll_once(first.as_mut()).await;
                    let _ = futures_poll_once(second.as_mut()).await;
                }
                // The second, dropped, took only its own waker: the first is still woken.
                first.await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(flag.wakers().len(), 1);
        flag.raise();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("woken").expect("joined");
    }

    #[test]
    fn freed_slots_are_reused() {
        let flag = Flag::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for _ in 0..1000 {
            let mut w = std::pin::pin!(flag.wait());
            assert!(w.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(flag.wakers().slots.len(), 1, "one slot, freed and taken again");
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut f).poll(cx))).await
    }
}
