//! Locks that survive a panic elsewhere.
//!
//! A panic in one task while it holds a std `Mutex` poisons it, and `lock().expect()` would
//! then take the whole controller down with it: `/metrics`, the control socket and the GC
//! would all fail on every later call. Every value guarded here is valid after any partial
//! update (map handles, counters, the last report), so a poisoned lock is simply taken.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking it even if a panicking holder poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("a task panics while holding the lock");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
