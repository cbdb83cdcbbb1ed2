//! TCP flag handling: which packets may create state, and how flags move a connection.

use crate::ct::{FLAG_FIN_BACKEND, FLAG_FIN_CLIENT, FLAG_RST, FLAG_SEEN_NON_SYN};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// A connection opener: SYN without ACK, RST or FIN. Only these may create tracking state
/// (a SYN|ACK, or a SYN carrying RST/FIN, is never a new connection).
#[must_use]
#[inline(always)]
pub const fn is_pure_syn(flags: u8) -> bool {
    flags & (SYN | ACK | RST | FIN) == SYN
}

/// Which end sent a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → backend.
    Forward,
    /// Backend → client.
    Reply,
}

/// The connection-state bits a packet with TCP `flags` adds (Cilium's closing semantics:
/// FIN closes one direction, RST both; the entry lives on for the close timeout so final ACKs
/// and retransmitted FINs are still translated).
#[must_use]
#[inline(always)]
pub const fn state_bits(flags: u8, dir: Direction) -> u32 {
    let mut bits = 0;
    if !is_pure_syn(flags) {
        bits |= FLAG_SEEN_NON_SYN;
    }
    if flags & FIN != 0 {
        bits |= match dir {
            Direction::Forward => FLAG_FIN_CLIENT,
            Direction::Reply => FLAG_FIN_BACKEND,
        };
    }
    if flags & RST != 0 {
        bits |= FLAG_RST;
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ct::{is_closed, is_closing};

    #[test]
    fn only_a_bare_syn_opens() {
        assert!(is_pure_syn(SYN));
        assert!(is_pure_syn(SYN | PSH)); // odd but harmless: no ACK, still an opener
        assert!(!is_pure_syn(SYN | ACK));
        assert!(!is_pure_syn(SYN | RST));
        assert!(!is_pure_syn(SYN | FIN));
        assert!(!is_pure_syn(ACK));
        assert!(!is_pure_syn(0));
    }

    #[test]
    fn every_flag_byte_is_classified_consistently() {
        for flags in 0..=u8::MAX {
            let fwd = state_bits(flags, Direction::Forward);
            assert_eq!(
                fwd & FLAG_SEEN_NON_SYN == 0,
                is_pure_syn(flags),
                "{flags:#x}"
            );
            assert_eq!(fwd & FLAG_RST != 0, flags & RST != 0);
            assert_eq!(state_bits(flags, Direction::Reply) & FLAG_FIN_CLIENT, 0);
        }
    }

    #[test]
    fn close_needs_both_fins_or_a_reset() {
        let one = state_bits(FIN | ACK, Direction::Forward);
        assert!(is_closing(one) && !is_closed(one));
        let both = one | state_bits(FIN | ACK, Direction::Reply);
        assert!(is_closed(both));
        assert!(is_closed(state_bits(RST, Direction::Reply)));
        assert!(!is_closing(state_bits(ACK | PSH, Direction::Forward)));
    }
}
