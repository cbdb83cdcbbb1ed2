//! Waiting for something to become true, bounded.
//!
//! Two shapes cover the controller's waits, and each wait names its interval where it is
//! used, with why:
//! - [`until`]: ask a probe until it has an answer or a deadline passes. A probe's error
//!   ends the wait at once (a query that failed is not "not yet").
//! - [`retry`]: repeat an operation whose errors are transient (etcd electing a leader, a
//!   slot still held by a walsender that is exiting) until it works or a deadline passes,
//!   then give its last error.
//!
//! And two variants of them:
//! - [`until_with`]: [`until`] for a probe that carries something from one look to the next
//!   (what it has done so far, what it saw last), given back when the deadline passes so
//!   the caller can say what was still missing.
//! - [`retry_times`]: [`retry`] bounded by a number of tries rather than a deadline, for
//!   an operation that fails fast when it fails, and only while its error is transient.
//!
//! Probes are plain closures returning a future (not async closures): the futures of async
//! closures that borrow their captures are not provably `Send`, and the cutover runs on a
//! spawned task.
//!
//! Each runs its probe at least once, so a wait that is given no time still looks; `until`
//! and `until_with` look once more at the deadline, `retry` tries no more once an attempt
//! ends past it.

use std::{
    ops::ControlFlow,
    time::{Duration, Instant},
};

/// Asks `probe` every `every` until it answers `Some`, giving `Ok(None)` once `deadline`
/// has passed without an answer (the caller says why that matters). A probe's error is
/// returned at once.
pub async fn until<T, E, Fut>(
    deadline: Instant,
    every: Duration,
    mut probe: impl FnMut() -> Fut,
) -> Result<Option<T>, E>
where
    Fut: Future<Output = Result<Option<T>, E>>,
{
    // `until_with` with nothing carried: one loop decides when to look.
    let looked = until_with(deadline, every, (), |()| {
        let look = probe();
        async move {
            Ok(look
                .await?
                .map_or(ControlFlow::Continue(()), ControlFlow::Break))
        }
    })
    .await?;
    Ok(match looked {
        ControlFlow::Break(answer) => Some(answer),
        ControlFlow::Continue(()) => None,
    })
}

/// [`until`] for a probe that carries state from one look to the next: each look is given
/// what the last one left (`first` for the first look) and answers `Break(answer)`, or
/// `Continue(state)` for "not yet". Once `deadline` has passed without an answer, the last
/// look's state comes back as `Continue(state)`, for the caller to say what was missing. The
/// looks are timed as [`until`]'s.
///
/// The state is passed by value, not borrowed, so the probe's future may own it (a closure
/// cannot lend its captures to the future it returns).
pub async fn until_with<S, T, E, Fut>(
    deadline: Instant,
    every: Duration,
    first: S,
    mut probe: impl FnMut(S) -> Fut,
) -> Result<ControlFlow<T, S>, E>
where
    Fut: Future<Output = Result<ControlFlow<T, S>, E>>,
{
    let mut state = first;
    loop {
        let past = Instant::now() >= deadline;
        match probe(state).await? {
            ControlFlow::Break(answer) => return Ok(ControlFlow::Break(answer)),
            ControlFlow::Continue(left) if past => return Ok(ControlFlow::Continue(left)),
            ControlFlow::Continue(left) => state = left,
        }
        tokio::time::sleep(every.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Checks `cond` every `every` until it holds (`true`) or `deadline` passes (`false`).
pub async fn until_true(
    deadline: Instant,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> bool {
    let answer: Result<Option<()>, std::convert::Infallible> = until(deadline, every, || {
        std::future::ready(Ok(cond().then_some(())))
    })
    .await;
    matches!(answer, Ok(Some(())))
}

/// Runs `op` every `every` until it succeeds; once `deadline` has passed, its error is
/// returned.
pub async fn retry<T, E, Fut>(
    deadline: Instant,
    every: Duration,
    mut op: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            // Checked after the attempt: one that starts just before the deadline and fails
            // is the last, and an attempt may itself take a while.
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                tokio::time::sleep(every.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
            }
        }
    }
}

/// Runs `op` up to `times` times (at least once), `every` apart, while its error is
/// `transient`: another error is returned at once, and the last one when the tries are used
/// up.
pub async fn retry_times<T, E, Fut>(
    times: u32,
    every: Duration,
    transient: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut tried = 0;
    loop {
        tried += 1;
        match op().await {
            Err(e) if tried < times && transient(&e) => tokio::time::sleep(every).await,
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn until_answers_as_soon_as_the_probe_does() {
        let mut n = 0;
        let got: Result<_, ()> = until(
            Instant::now() + Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                std::future::ready(Ok((n == 3).then_some(n)))
            },
        )
        .await;
        assert_eq!(got, Ok(Some(3)));
    }

    #[tokio::test]
    async fn until_looks_once_more_at_the_deadline_and_an_error_ends_it() {
        let mut n = 0;
        let got: Result<Option<()>, ()> = until(Instant::now(), Duration::from_secs(1), || {
            n += 1;
            std::future::ready(Ok(None))
        })
        .await;
        assert_eq!((got, n), (Ok(None), 1), "no time given: one look");
        let started = Instant::now();
        let got: Result<Option<()>, &str> = until(
            Instant::now() + Duration::from_secs(5),
            Duration::from_millis(1),
            || std::future::ready(Err("gone")),
        )
        .await;
        assert_eq!(got, Err("gone"));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn until_true_says_whether_it_came_true() {
        let mut n = 0;
        let t = Instant::now() + Duration::from_secs(5);
        assert!(
            until_true(t, Duration::from_millis(1), || {
                n += 1;
                n == 4
            })
            .await
        );
        assert!(!until_true(Instant::now(), Duration::from_millis(1), || false).await);
    }

    #[tokio::test]
    async fn retry_gives_the_last_error_after_the_deadline() {
        let mut n = 0;
        let started = Instant::now();
        let got: Result<(), u32> = retry(
            Instant::now() + Duration::from_millis(30),
            Duration::from_millis(5),
            || {
                n += 1;
                std::future::ready(Err(n))
            },
        )
        .await;
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(got, Err(n));
        assert!(n >= 3, "{n} tries");
        let ok: Result<u32, ()> = retry(Instant::now(), Duration::from_secs(1), || {
            std::future::ready(Ok(7))
        })
        .await;
        assert_eq!(ok, Ok(7));
    }

    #[tokio::test]
    async fn until_with_carries_the_state_and_gives_the_last_back() {
        let t = Instant::now() + Duration::from_secs(5);
        let got: Result<_, ()> = until_with(t, Duration::from_millis(1), 0, |n| {
            std::future::ready(Ok(if n == 3 {
                ControlFlow::Break(n * 10)
            } else {
                ControlFlow::Continue(n + 1)
            }))
        })
        .await;
        assert_eq!(got, Ok(ControlFlow::Break(30)));
        let got: Result<ControlFlow<(), u32>, ()> = until_with(
            Instant::now() + Duration::from_millis(20),
            Duration::from_millis(1),
            0,
            |n| std::future::ready(Ok(ControlFlow::Continue(n + 1))),
        )
        .await;
        assert!(
            matches!(got, Ok(ControlFlow::Continue(n)) if n >= 2),
            "{got:?}"
        );
        let got: Result<ControlFlow<(), u32>, ()> =
            until_with(Instant::now(), Duration::from_secs(1), 7, |n| {
                std::future::ready(Ok(ControlFlow::Continue(n + 1)))
            })
            .await;
        assert_eq!(got, Ok(ControlFlow::Continue(8)), "no time given: one look");
        let got: Result<ControlFlow<(), ()>, &str> = until_with(
            Instant::now() + Duration::from_secs(5),
            Duration::from_millis(1),
            (),
            |()| std::future::ready(Err("gone")),
        )
        .await;
        assert_eq!(got, Err("gone"));
    }

    #[tokio::test]
    async fn retry_times_stops_at_the_count_or_at_an_error_that_is_not_transient() {
        let mut n = 0;
        let got: Result<(), u32> = retry_times(
            3,
            Duration::from_millis(1),
            |_| true,
            || {
                n += 1;
                std::future::ready(Err(n))
            },
        )
        .await;
        assert_eq!((got, n), (Err(3), 3), "the last error, after 3 tries");
        let mut n = 0;
        let got: Result<(), u32> = retry_times(
            5,
            Duration::from_millis(1),
            |e| *e < 2,
            || {
                n += 1;
                std::future::ready(Err(n))
            },
        )
        .await;
        assert_eq!(got, Err(2), "not transient: returned at once");
        let mut n = 0;
        let got: Result<u32, u32> = retry_times(
            5,
            Duration::from_millis(1),
            |_| true,
            || {
                n += 1;
                std::future::ready(if n == 2 { Ok(n) } else { Err(n) })
            },
        )
        .await;
        assert_eq!(got, Ok(2));
        let mut n = 0;
        let got: Result<(), ()> = retry_times(
            0,
            Duration::from_secs(1),
            |()| true,
            || {
                n += 1;
                std::future::ready(Err(()))
            },
        )
        .await;
        assert_eq!((got, n), (Err(()), 1), "tried at least once");
    }
}
