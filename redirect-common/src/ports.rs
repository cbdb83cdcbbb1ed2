//! SNAT port probing.
//!
//! A new connection first tries to keep its client port when that port is inside the SNAT range
//! (Cilium's `__snat_try_keep_port`: fewer collisions when clients already spread their ports),
//! and otherwise starts at a random port. Each candidate is claimed by inserting the `REV` entry
//! with `BPF_NOEXIST`; on a collision the next candidate is a fresh random port (as Cilium's
//! retries are). Linear probing would be cheaper to reason about, but under churn the claimed
//! ports form long runs, and 32 linear probes then fail with most of the range still free; random
//! probes fail only with probability (claimed share)^32. The datapath bounds the probes at
//! [`crate::limits::SNAT_PROBES`].

/// The `attempt`-th SNAT port candidate (host byte order) for a client port (host order) in
/// the inclusive range `min..=max`. `random` is a fresh random number for this attempt; it is
/// ignored only for attempt 0 with the client port in range. A reversed range is treated as the
/// single port `min`.
#[must_use]
#[inline(always)]
pub const fn candidate(client_port: u16, random: u32, attempt: u32, min: u16, max: u16) -> u16 {
    if max <= min {
        return min;
    }
    let span = (max - min) as u32 + 1;
    let offset = if attempt == 0 && client_port >= min && client_port <= max {
        (client_port - min) as u32
    } else {
        random % span
    };
    #[expect(clippy::cast_possible_truncation, reason = "offset < span <= 65536")]
    let port = min + offset as u16;
    port
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn keeps_the_client_port_when_in_range() {
        assert_eq!(candidate(45000, 7, 0, 40000, 59999), 45000);
        assert_eq!(
            candidate(45000, 7, 1, 40000, 59999),
            40007,
            "after a collision: random"
        );
    }

    #[test]
    fn outside_the_range_starts_at_random() {
        assert_eq!(candidate(1234, 5, 0, 40000, 40009), 40005);
        assert_eq!(candidate(1234, 15, 0, 40000, 40009), 40005);
    }

    #[test]
    fn degenerate_ranges() {
        assert_eq!(candidate(1, 2, 3, 5000, 5000), 5000);
        assert_eq!(candidate(1, 2, 3, 6000, 5000), 6000);
        assert_eq!(candidate(65535, 0, 1, 0, 65535), 0);
    }

    proptest! {
        /// Every candidate is in range, and random probes reach every port of the range.
        #[test]
        fn probes_stay_in_range_and_reach_every_port(
            client in any::<u16>(), seed in any::<u32>(),
            min in 1024u16..65000, len in 0u16..200,
        ) {
            let max = min.saturating_add(len);
            let span = u32::from(max - min) + 1;
            let mut seen = HashSet::new();
            for attempt in 0..span * 64 {
                // A hash (murmur3's finaliser) stands in for bpf_get_prandom_u32.
                let mut random = seed ^ attempt.wrapping_mul(0x9e37_79b9);
                random ^= random >> 16;
                random = random.wrapping_mul(0x85eb_ca6b);
                random ^= random >> 13;
                random = random.wrapping_mul(0xc2b2_ae35);
                random ^= random >> 16;
                let p = candidate(client, random, attempt, min, max);
                prop_assert!((min..=max).contains(&p));
                seen.insert(p);
            }
            prop_assert!(u32::try_from(seen.len()).unwrap() >= span * 9 / 10, "{} of {} ports reached", seen.len(), span);
        }
    }
}
