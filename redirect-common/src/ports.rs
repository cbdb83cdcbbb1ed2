//! SNAT port probing.
//!
//! A new connection keeps its client port when that port is inside the SNAT range (Cilium's
//! `__snat_try_keep_port`: fewer collisions when clients already spread their ports), and
//! otherwise starts at a pseudo-random point. Each candidate is claimed by inserting the `REV`
//! entry with `BPF_NOEXIST`; on collision the next candidate is the following port, wrapping
//! inside the range (linear probing). The datapath bounds the probes at
//! [`crate::limits::SNAT_PROBES`].

/// The `attempt`-th SNAT port candidate (host byte order) for a client port (host order) in
/// the inclusive range `min..=max`. `random` is only used when the client port is outside the
/// range. A reversed range is treated as the single port `min`.
#[must_use]
#[inline(always)]
pub const fn candidate(client_port: u16, random: u32, attempt: u32, min: u16, max: u16) -> u16 {
    if max <= min {
        return min;
    }
    let span = (max - min) as u32 + 1;
    let start = if client_port >= min && client_port <= max {
        (client_port - min) as u32
    } else {
        random % span
    };
    let offset = (start + attempt % span) % span;
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
        assert_eq!(candidate(45000, 7, 1, 40000, 59999), 45001);
        assert_eq!(
            candidate(59999, 7, 1, 40000, 59999),
            40000,
            "wraps inside the range"
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
        /// Every candidate is in range, and `span` consecutive attempts visit every port of
        /// the range exactly once, so probing finds any free port.
        #[test]
        fn probing_covers_the_range(
            client in any::<u16>(), random in any::<u32>(),
            min in 1024u16..65000, len in 0u16..200,
        ) {
            let max = min.saturating_add(len);
            let span = u32::from(max - min) + 1;
            let mut seen = HashSet::new();
            for attempt in 0..span {
                let p = candidate(client, random, attempt, min, max);
                prop_assert!((min..=max).contains(&p));
                prop_assert!(seen.insert(p), "port {} visited twice", p);
            }
        }
    }
}
