//! The datapath stamps entries with `bpf_ktime_get_ns`, which is `CLOCK_MONOTONIC`.

use std::time::Duration;

/// Now, on the clock the datapath uses, in nanoseconds.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    let secs = u64::try_from(ts.tv_sec).expect("monotonic time is positive");
    let nanos = u64::try_from(ts.tv_nsec).expect("nanoseconds are positive");
    secs * 1_000_000_000 + nanos
}

/// Time elapsed since a datapath timestamp (zero if the stamp is in the future).
#[must_use]
pub fn since(stamp_ns: u64, now_ns: u64) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(stamp_ns))
}
