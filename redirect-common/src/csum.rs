//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All functions work on 16-bit words exactly as they are stored in the packet. The one's
//! complement sum is independent of byte order (RFC 1071 §2(B)), so neither side needs to
//! swap bytes: load the raw field, update, store it back.

/// Folds a 32-bit accumulator into 16 bits with end-around carry.
#[must_use]
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    #[expect(
        clippy::cast_possible_truncation,
        reason = "folded twice: fits in 16 bits"
    )]
    let folded = sum as u16;
    folded
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one 16-bit word `old` → `new`.
#[must_use]
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(sum)
}

/// [`replace2`] for a 32-bit field (an IPv4 address), as two 16-bit words.
#[must_use]
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "splitting into 16-bit halves"
    )]
    let sum = (!check) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + ((new >> 16) as u16) as u32;
    !fold(sum)
}

/// The one's complement sum of `data` taken as 16-bit words in memory order, with an odd
/// final byte padded with zero. Start `initial` at 0, or at a pseudo-header sum.
#[must_use]
pub fn sum_words(data: &[u8], initial: u32) -> u32 {
    let mut sum = u64::from(initial);
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_ne_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    while sum > 0xffff_ffff {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    #[expect(clippy::cast_possible_truncation, reason = "reduced below 2^32 above")]
    let sum = sum as u32;
    sum
}

/// The full checksum of an IPv4 header whose checksum field holds zero.
#[must_use]
pub fn ipv4_header(header: &[u8]) -> u16 {
    !fold(sum_words(header, 0))
}

/// The full TCP checksum over the IPv4 pseudo-header and `segment` (whose checksum field
/// holds zero). Addresses are as stored in the packet.
#[must_use]
pub fn tcp_ipv4(src_addr_raw: [u8; 4], dst_addr_raw: [u8; 4], segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src_addr_raw);
    pseudo[4..8].copy_from_slice(&dst_addr_raw);
    pseudo[9] = 6; // protocol: TCP
    let len = u16::try_from(segment.len()).expect("a TCP segment fits in 64 KiB");
    pseudo[10..12].copy_from_slice(&len.to_be_bytes());
    !fold(sum_words(segment, sum_words(&pseudo, 0)))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    fn word(bytes: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([bytes[at], bytes[at + 1]])
    }

    /// A TCP/IPv4 header pair with valid checksums, built the slow way.
    fn packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        let total = u16::try_from(40 + payload.len()).unwrap();
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let c = ipv4_header(&ip);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        let mut tcp = Vec::from([0u8; 20]);
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18;
        tcp.extend_from_slice(payload);
        let c = tcp_ipv4(src, dst, &tcp);
        tcp[16..18].copy_from_slice(&c.to_ne_bytes());
        let mut out = Vec::from(ip);
        out.extend_from_slice(&tcp);
        out
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // The example header from RFC 1071 errata / Wikipedia's "IPv4 header checksum".
        let h: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&h).to_ne_bytes(), [0xb8, 0x61]);
    }

    #[test]
    fn valid_checksum_sums_to_all_ones() {
        let p = packet([198, 18, 0, 2], [198, 18, 0, 1], 40000, 5432, b"hello");
        assert_eq!(fold(sum_words(&p[..20], 0)), 0xffff);
    }

    proptest! {
        /// The datapath's NAT rewrite (both addresses, both ports) updated incrementally
        /// equals a full recomputation, for any addresses, ports and payload.
        #[test]
        fn incremental_nat_rewrite_matches_full_recompute(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(),
            nsrc in any::<[u8; 4]>(), ndst in any::<[u8; 4]>(),
            sport in any::<u16>(), dport in any::<u16>(),
            nsport in any::<u16>(), ndport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut p = packet(src, dst, sport, dport, &payload);
            let old_src = u32::from_ne_bytes(src);
            let old_dst = u32::from_ne_bytes(dst);
            let new_src = u32::from_ne_bytes(nsrc);
            let new_dst = u32::from_ne_bytes(ndst);
            let old_sport = word(&p, 20);
            let old_dport = word(&p, 22);
            let new_sport = u16::from_ne_bytes(nsport.to_be_bytes());
            let new_dport = u16::from_ne_bytes(ndport.to_be_bytes());

            let ip_c = replace4(replace4(word(&p, 10), old_src, new_src), old_dst, new_dst);
            let mut tcp_c = word(&p, 36);
            tcp_c = replace4(tcp_c, old_src, new_src);
            tcp_c = replace4(tcp_c, old_dst, new_dst);
            tcp_c = replace2(tcp_c, old_sport, new_sport);
            tcp_c = replace2(tcp_c, old_dport, new_dport);

            let expected = packet(nsrc, ndst, nsport, ndport, &payload);
            p[10..12].copy_from_slice(&ip_c.to_ne_bytes());
            p[12..16].copy_from_slice(&nsrc);
            p[16..20].copy_from_slice(&ndst);
            p[20..22].copy_from_slice(&new_sport.to_ne_bytes());
            p[22..24].copy_from_slice(&new_dport.to_ne_bytes());
            p[36..38].copy_from_slice(&tcp_c.to_ne_bytes());
            // One's complement has two zeros; RFC 1624 never produces 0xffff → compare sums.
            prop_assert_eq!(fold(sum_words(&p[..20], 0)), 0xffff);
            prop_assert_eq!(
                fold(sum_words(&p[20..], sum_words(&pseudo(nsrc, ndst, p.len() - 20), 0))),
                0xffff
            );
            prop_assert_eq!(&p[..10], &expected[..10]);
            prop_assert_eq!(&p[12..36], &expected[12..36]);
        }

        #[test]
        fn replace_with_same_value_is_identity(check in any::<u16>(), v in any::<u32>()) {
            // Holds for every checksum except the negative zero, which RFC 1624 normalises.
            prop_assume!(check != 0xffff);
            prop_assert_eq!(replace4(check, v, v), check);
        }
    }

    fn pseudo(src: [u8; 4], dst: [u8; 4], len: usize) -> [u8; 12] {
        let mut p = [0u8; 12];
        p[..4].copy_from_slice(&src);
        p[4..8].copy_from_slice(&dst);
        p[9] = 6;
        p[10..12].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        p
    }
}
