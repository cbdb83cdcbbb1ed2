//! TCP flag handling: which packets may create state, and how flags move a connection.

use crate::ct::{
    CtEntry, FLAG_BACKEND_CLOSED_FIRST, FLAG_FIN_BACKEND, FLAG_FIN_CLIENT, FLAG_RST,
    FLAG_SEEN_NON_SYN, FLAG_STALE_ACK, FLAG_SYNACK_SEEN, SeqSpace,
};

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

/// A TCP segment as conntrack sees it (numbers in host byte order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// Payload bytes.
    pub len: u32,
}

impl Segment {
    /// The sequence number after this segment (SYN and FIN take one each).
    #[must_use]
    #[inline(always)]
    pub const fn end(&self) -> u32 {
        self.seq
            .wrapping_add(self.len)
            .wrapping_add((self.flags & SYN != 0) as u32)
            .wrapping_add((self.flags & FIN != 0) as u32)
    }
}

/// What conntrack made of a segment on a tracked connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Translate and forward it.
    Tracked,
    /// Forward it: the client's ACK of the backend's SYN-ACK made the entry established.
    HandshakeCompleted,
    /// Forward it to the pinned backend: a SYN on a live connection never opens a new one
    /// (a real client that lost its state answers the backend's challenge ACK with a RST).
    SynOnLive,
    /// Forward it, change nothing: a RST inside the window but not exact, which the peer
    /// answers with a challenge ACK (RFC 5961).
    RstChallenged,
    /// Drop it: a RST whose sequence number is outside the window (RFC 5961's blind reset).
    RstOutOfWindow,
}

/// The client's sequence space as its SYN opens it: acknowledged up to the SYN, sent up to
/// the end of any Fast Open data it carries.
#[must_use]
#[inline(always)]
pub const fn opened_by(syn: &Segment) -> SeqSpace {
    SeqSpace {
        next: syn.end(),
        acked: syn.seq.wrapping_add(1),
    }
}

/// `a` is later than `b` in sequence space (RFC 1982 arithmetic).
#[must_use]
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    a.wrapping_sub(b).cast_signed() > 0
}

/// `lo <= x <= hi` in sequence space.
#[must_use]
#[inline(always)]
pub const fn seq_within(x: u32, lo: u32, hi: u32) -> bool {
    x.wrapping_sub(lo) <= hi.wrapping_sub(lo)
}

#[inline(always)]
fn advance(field: &mut u32, to: u32) {
    if seq_after(to, *field) {
        *field = to;
    }
}

/// How far a segment may start beyond what this host has seen of its sender and still count:
/// data lost before this host leaves a gap, and a segment after the gap is still genuine. One
/// that starts farther off is ignored for the sequence state (it is still forwarded, and the
/// endpoint judges it), so a blind segment cannot drag `next` anywhere it likes.
pub const SEQ_SLACK: u32 = 1 << 20;

/// Moves `space.next` to the end of `seg` if the segment starts where it plausibly can.
#[inline(always)]
fn advance_next(space: &mut SeqSpace, seg: &Segment) {
    if seq_within(
        seg.seq,
        space.acked.wrapping_sub(SEQ_SLACK),
        space.next.wrapping_add(SEQ_SLACK),
    ) {
        advance(&mut space.next, seg.end());
    }
}

/// Moves `space.acked` up to `ack`, but never past what the sender has sent: a bogus or stale
/// acknowledgement must not widen the window a RST is checked against.
#[inline(always)]
fn advance_acked(space: &mut SeqSpace, ack: u32) {
    if seq_after(ack, space.acked) && !seq_after(ack, space.next) {
        space.acked = ack;
    }
}

/// Whether a RST from the sender of `space` is one its peer will accept. RFC 5961: only a RST
/// at exactly the peer's `RCV.NXT` resets a connection; anywhere else in the window the peer
/// answers with a challenge ACK, to which a genuine sender replies with an exact RST. The
/// peer's `RCV.NXT` is what it last acknowledged (`acked`), or everything sent (`next`) if its
/// acknowledgement has not passed this host yet. A blind attacker has two values in 2^32.
#[must_use]
#[inline(always)]
pub const fn rst_exact(seq: u32, space: &SeqSpace) -> bool {
    seq == space.acked || seq == space.next
}

/// Whether a RST lies inside the window (`acked..=next`): not exact, so the peer will challenge
/// it; forwarded without changing any state.
#[must_use]
#[inline(always)]
pub const fn rst_in_window(seq: u32, space: &SeqSpace) -> bool {
    seq_within(seq, space.acked, space.next)
}

/// Whether the FIN of `seg` (its own sequence number, after the segment's data) belongs to the
/// connection of `space`, as it was before the segment: at or after what the peer
/// acknowledged, and at most [`SEQ_SLACK`] beyond what this host saw sent (data lost before
/// this host leaves a gap; a retransmission may start before `acked` and end with the FIN).
/// A FIN of an older connection on the tuple lies elsewhere in sequence space.
#[must_use]
#[inline(always)]
pub const fn fin_in_window(seg: &Segment, space: &SeqSpace) -> bool {
    seq_within(
        seg.seq.wrapping_add(seg.len),
        space.acked,
        space.next.wrapping_add(SEQ_SLACK),
    )
}

/// Applies a segment seen in direction `dir` to a tracked entry: its state flags and both
/// sequence spaces. Writes only what changes (the entry is shared by every CPU).
///
/// - A SYN-ACK records the backend's sequence space but does not make the entry established:
///   only the client's ACK of it does, so SYNs whose SYN-ACKs never reach the client stay
///   half-open and expire at the SYN timeout.
/// - A RST closes the entry only inside the window; otherwise it is dropped.
/// - A FIN from the backend before the client's records who holds `TIME_WAIT`.
#[inline(always)]
pub fn observe(e: &mut CtEntry, dir: Direction, seg: Segment) -> Observed {
    match dir {
        Direction::Forward => observe_client(e, &seg),
        Direction::Reply => observe_backend(e, &seg),
    }
}

/// Sets state flags `bits` on the entry, writing only if one is new (the entry is shared by
/// every CPU).
#[inline(always)]
fn set_flags(e: &mut CtEntry, bits: u32) {
    if e.flags & bits != bits {
        e.flags |= bits;
    }
}

/// A segment from the client (see [`observe`]).
#[inline(always)]
fn observe_client(e: &mut CtEntry, seg: &Segment) -> Observed {
    let flags = seg.flags;
    let established = e.flags & FLAG_SEEN_NON_SYN != 0;
    let synack_seen = e.flags & FLAG_SYNACK_SEEN != 0;
    if is_pure_syn(flags) {
        if established {
            return Observed::SynOnLive;
        }
        client_syn(e, seg);
        return Observed::Tracked;
    }
    let client_before = e.client_seq;
    let mut bits = 0;
    let mut observed = Observed::Tracked;
    if flags & RST != 0 {
        if let Some(verdict) = client_rst_verdict(e, seg.seq, established) {
            return verdict;
        }
        bits |= FLAG_RST;
    } else if !established
        && flags & ACK != 0
        && synack_seen
        && seq_within(seg.ack, e.backend_seq.acked, e.backend_seq.next)
    {
        bits |= FLAG_SEEN_NON_SYN;
        observed = Observed::HandshakeCompleted;
    } else if established {
        bits |= FLAG_SEEN_NON_SYN;
    }
    advance_next(&mut e.client_seq, seg);
    if flags & ACK != 0 && synack_seen {
        advance_acked(&mut e.backend_seq, seg.ack);
    }
    if flags & FIN != 0 && fin_in_window(seg, &client_before) {
        bits |= FLAG_FIN_CLIENT;
    }
    set_flags(e, bits);
    observed
}

/// The client's opener on an entry not yet established.
#[inline(always)]
fn client_syn(e: &mut CtEntry, seg: &Segment) {
    // A retransmitted opener changes nothing (Linux may resend a Fast Open SYN without its
    // data). A new ISN, after the client gave up, defines the client's sequence space afresh
    // and voids what the backend said to the old one.
    let isn_next = seg.seq.wrapping_add(1);
    let same_attempt = seq_within(
        isn_next,
        e.client_seq.next.wrapping_sub(SEQ_SLACK),
        e.client_seq.next,
    );
    if !same_attempt {
        e.client_seq = opened_by(seg);
        e.flags &= !(FLAG_SYNACK_SEEN | FLAG_STALE_ACK);
        e.backend_seq = SeqSpace::default();
    }
}

/// What becomes of a client's RST at `seq`: `None` if it is exact (it closes the entry),
/// otherwise the answer, which leaves the entry as it is.
#[inline(always)]
fn client_rst_verdict(e: &CtEntry, seq: u32, established: bool) -> Option<Observed> {
    if rst_exact(seq, &e.client_seq) {
        None
    } else if rst_in_window(seq, &e.client_seq) {
        Some(Observed::RstChallenged)
    } else if !established && e.flags & FLAG_STALE_ACK != 0 && seq == e.backend_seq.acked {
        // RFC 793's reset of a half-open connection: the client, in SYN-SENT, answers a stale
        // socket's ACK so the backend drops it; the client's own attempt goes on (its next SYN
        // finds the tuple free), so the entry stays open.
        Some(Observed::Tracked)
    } else {
        Some(Observed::RstOutOfWindow)
    }
}

/// A segment from the backend (see [`observe`]).
#[inline(always)]
fn observe_backend(e: &mut CtEntry, seg: &Segment) -> Observed {
    let flags = seg.flags;
    let established = e.flags & FLAG_SEEN_NON_SYN != 0;
    let synack_seen = e.flags & FLAG_SYNACK_SEEN != 0;
    let backend_before = e.backend_seq;
    let mut bits = 0;
    if flags & RST != 0 {
        if let Some(verdict) = backend_rst_verdict(e, seg, synack_seen) {
            return verdict;
        }
        bits |= FLAG_RST;
    }
    bits |= backend_sequence(e, seg, established, synack_seen);
    if flags & ACK != 0 {
        advance_acked(&mut e.client_seq, seg.ack);
    }
    if flags & FIN != 0 && synack_seen && fin_in_window(seg, &backend_before) {
        bits |= backend_fin(e, seg);
    }
    set_flags(e, bits);
    Observed::Tracked
}

/// What becomes of a backend's RST: `None` if it closes the entry, otherwise the answer,
/// which leaves the entry as it is.
#[inline(always)]
fn backend_rst_verdict(e: &CtEntry, seg: &Segment, synack_seen: bool) -> Option<Observed> {
    if synack_seen && !rst_exact(seg.seq, &e.backend_seq) {
        return Some(if rst_in_window(seg.seq, &e.backend_seq) {
            Observed::RstChallenged
        } else {
            Observed::RstOutOfWindow
        });
    }
    // Before a SYN-ACK, a refused connection: <SEQ=0><ACK=SYN+1><CTL=RST,ACK>
    // (SYN+1+len if the SYN's Fast Open data was taken).
    let refusal =
        seg.flags & ACK != 0 && seq_within(seg.ack, e.client_seq.acked, e.client_seq.next);
    if !synack_seen && !refusal {
        return Some(Observed::RstOutOfWindow);
    }
    None
}

/// What a backend segment does to the backend's sequence space (its SYN-ACK, or a stale
/// socket's ACK, or data): the state flags it sets.
#[inline(always)]
fn backend_sequence(e: &mut CtEntry, seg: &Segment, established: bool, synack_seen: bool) -> u32 {
    let flags = seg.flags;
    // A SYN-ACK is this attempt's only if it acknowledges this attempt's SYN; one that does
    // not comes from an older attempt on the same backend-side tuple (SYN_RECV
    // retransmitting), and is handled like a stale ACK.
    // (Fast Open: a server that did not take the SYN's data acknowledges only ISN+1.)
    let synack_of_this_attempt =
        flags & ACK != 0 && seq_within(seg.ack, e.client_seq.acked, e.client_seq.next);
    if flags & SYN != 0
        && !synack_of_this_attempt
        && !established
        && !synack_seen
        && flags & RST == 0
    {
        if e.backend_seq.acked != seg.ack {
            e.backend_seq.acked = seg.ack;
        }
        return FLAG_STALE_ACK;
    }
    if flags & SYN != 0 {
        // This attempt's SYN-ACK (or its retransmission) defines the backend's space once;
        // after that, and after the handshake, a SYN-ACK changes nothing.
        if !established && !synack_seen && synack_of_this_attempt && flags & RST == 0 {
            e.backend_seq = SeqSpace {
                next: seg.end(),
                acked: seg.end(),
            };
            return FLAG_SYNACK_SEEN;
        }
    } else if synack_seen {
        advance_next(&mut e.backend_seq, seg);
    } else if !established && flags & (ACK | RST) == ACK {
        // No SYN-ACK yet, but an ACK: a stale socket answering the SYN (see FLAG_STALE_ACK).
        // Remember what the client's reset of it will carry.
        if e.backend_seq.acked != seg.ack {
            e.backend_seq.acked = seg.ack;
        }
        return FLAG_STALE_ACK;
    }
    0
}

/// The flags a backend's FIN inside the window sets. The backend holds `TIME_WAIT` unless its
/// FIN acknowledges the client's: if it sent its FIN before the client's arrived (FINs
/// crossing), it goes through CLOSING to `TIME_WAIT` as well.
#[inline(always)]
fn backend_fin(e: &CtEntry, seg: &Segment) -> u32 {
    let acks_client_fin =
        e.flags & FLAG_FIN_CLIENT != 0 && seg.flags & ACK != 0 && seg.ack == e.client_seq.next;
    if acks_client_fin {
        FLAG_FIN_BACKEND
    } else {
        FLAG_FIN_BACKEND | FLAG_BACKEND_CLOSED_FIRST
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use proptest::prelude::*;

    use super::*;
    use crate::ct::{is_closed, is_closing, port_reusable_at_once};

    const CLIENT_ISN: u32 = 1000;
    const BACKEND_ISN: u32 = 9000;

    fn seg(flags: u8, seq: u32, ack: u32, len: u32) -> Segment {
        Segment {
            flags,
            seq,
            ack,
            len,
        }
    }

    /// An entry as `open` creates it, after the client's SYN.
    fn opened() -> CtEntry {
        let mut e = CtEntry::default();
        assert_eq!(
            observe(&mut e, Direction::Forward, seg(SYN, CLIENT_ISN, 0, 0)),
            Observed::Tracked
        );
        e
    }

    /// The SYN-ACK, then the client's ACK of it.
    fn complete_handshake(e: &mut CtEntry) {
        observe(
            e,
            Direction::Reply,
            seg(SYN | ACK, BACKEND_ISN, CLIENT_ISN + 1, 0),
        );
        assert_eq!(
            observe(
                e,
                Direction::Forward,
                seg(ACK, CLIENT_ISN + 1, BACKEND_ISN + 1, 0)
            ),
            Observed::HandshakeCompleted
        );
    }

    fn established() -> CtEntry {
        let mut e = opened();
        complete_handshake(&mut e);
        e
    }

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
    fn a_synack_alone_leaves_the_entry_half_open() {
        let mut e = opened();
        observe(
            &mut e,
            Direction::Reply,
            seg(SYN | ACK, BACKEND_ISN, CLIENT_ISN + 1, 0),
        );
        assert_eq!(
            e.flags & FLAG_SEEN_NON_SYN,
            0,
            "not established by the backend"
        );
        assert!(
            port_reusable_at_once(e.flags),
            "a half-open port frees at once"
        );
        // A blind ACK that does not acknowledge the SYN-ACK does not complete it either.
        observe(&mut e, Direction::Forward, seg(ACK, CLIENT_ISN + 1, 5, 0));
        assert_eq!(e.flags & FLAG_SEEN_NON_SYN, 0);
        let e = established();
        assert_ne!(e.flags & FLAG_SEEN_NON_SYN, 0);
    }

    #[test]
    fn an_ack_without_a_synack_never_establishes() {
        let mut e = opened();
        observe(&mut e, Direction::Forward, seg(ACK, CLIENT_ISN + 1, 1, 0));
        assert_eq!(e.flags & FLAG_SEEN_NON_SYN, 0);
    }

    #[test]
    fn a_rst_counts_only_inside_the_window() {
        let mut e = established();
        // The client sent 100 bytes the backend has acknowledged 40 of.
        observe(
            &mut e,
            Direction::Forward,
            seg(ACK | PSH, CLIENT_ISN + 1, BACKEND_ISN + 1, 100),
        );
        observe(
            &mut e,
            Direction::Reply,
            seg(ACK, BACKEND_ISN + 1, CLIENT_ISN + 41, 0),
        );
        let mut copy = e;
        assert_eq!(
            observe(
                &mut copy,
                Direction::Forward,
                seg(RST, CLIENT_ISN + 70, 0, 0)
            ),
            Observed::RstChallenged,
            "in the window but not exact: the peer challenges it"
        );
        assert_eq!(copy, e);
        for bad in [CLIENT_ISN + 40, CLIENT_ISN + 102, 0, CLIENT_ISN + 70_000] {
            let mut copy = e;
            assert_eq!(
                observe(&mut copy, Direction::Forward, seg(RST, bad, 0, 0)),
                Observed::RstOutOfWindow,
                "seq {bad}"
            );
            assert_eq!(copy, e, "a rejected RST changes nothing");
        }
        for good in [CLIENT_ISN + 41, CLIENT_ISN + 101] {
            let mut copy = e;
            assert_eq!(
                observe(&mut copy, Direction::Forward, seg(RST, good, 0, 0)),
                Observed::Tracked
            );
            assert!(is_closed(copy.flags));
        }
        // From the backend: exactly its RCV.NXT as the client acknowledged it.
        let mut copy = e;
        assert_eq!(
            observe(&mut copy, Direction::Reply, seg(RST, BACKEND_ISN + 2, 0, 0)),
            Observed::RstOutOfWindow
        );
        assert_eq!(
            observe(
                &mut copy,
                Direction::Reply,
                seg(RST | ACK, BACKEND_ISN + 1, 0, 0)
            ),
            Observed::Tracked
        );
        assert!(is_closed(copy.flags) && port_reusable_at_once(copy.flags));
    }

    #[test]
    fn a_refused_connection_is_reset_only_by_an_ack_of_the_syn() {
        let mut e = opened();
        assert_eq!(
            observe(&mut e, Direction::Reply, seg(RST | ACK, 0, 77, 0)),
            Observed::RstOutOfWindow
        );
        assert_eq!(
            observe(
                &mut e,
                Direction::Reply,
                seg(RST | ACK, 0, CLIENT_ISN + 1, 0)
            ),
            Observed::Tracked
        );
        assert!(is_closed(e.flags));
    }

    #[test]
    fn a_stale_backend_socket_is_reset_without_closing_the_new_attempt() {
        // The SYN lands on a backend tuple still in LAST_ACK or TIME_WAIT: a bare ACK comes
        // back, the client in SYN-SENT answers with <SEQ=SEG.ACK><CTL=RST> (RFC 793).
        let mut e = opened();
        let stale_ack = CLIENT_ISN.wrapping_sub(123_456_789);
        observe(&mut e, Direction::Reply, seg(ACK, 42, stale_ack, 0));
        assert_eq!(
            e.client_seq.acked,
            CLIENT_ISN + 1,
            "a stale ACK widens nothing"
        );
        assert_eq!(
            observe(
                &mut e,
                Direction::Forward,
                seg(RST, stale_ack.wrapping_add(1), 0, 0)
            ),
            Observed::RstOutOfWindow,
            "only the exact stale acknowledgement"
        );
        assert_eq!(
            observe(&mut e, Direction::Forward, seg(RST, stale_ack, 0, 0)),
            Observed::Tracked
        );
        assert!(!is_closing(e.flags), "the client's attempt goes on");
        // Its retransmitted SYN then completes normally.
        observe(&mut e, Direction::Forward, seg(SYN, CLIENT_ISN, 0, 0));
        complete_handshake(&mut e);
    }

    #[test]
    fn an_ack_beyond_what_was_sent_never_widens_the_window() {
        let mut e = established();
        observe(
            &mut e,
            Direction::Reply,
            seg(ACK, BACKEND_ISN + 1, CLIENT_ISN + 1_000_000, 0),
        );
        assert_eq!(e.client_seq.acked, CLIENT_ISN + 1);
        assert_eq!(
            observe(
                &mut e,
                Direction::Forward,
                seg(RST, CLIENT_ISN + 500_000, 0, 0)
            ),
            Observed::RstOutOfWindow
        );
    }

    #[test]
    fn a_syn_on_a_live_connection_changes_nothing() {
        let e = established();
        let mut copy = e;
        assert_eq!(
            observe(&mut copy, Direction::Forward, seg(SYN, 123_456, 0, 0)),
            Observed::SynOnLive
        );
        assert_eq!(copy, e);
    }

    #[test]
    fn who_closed_first_decides_the_quarantine() {
        // PostgreSQL's usual close: Terminate, the client's FIN, then the backend's.
        let mut e = established();
        observe(
            &mut e,
            Direction::Forward,
            seg(FIN | ACK, CLIENT_ISN + 1, BACKEND_ISN + 1, 0),
        );
        assert!(is_closing(e.flags) && !is_closed(e.flags));
        observe(
            &mut e,
            Direction::Reply,
            seg(FIN | ACK, BACKEND_ISN + 1, CLIENT_ISN + 2, 0),
        );
        assert!(is_closed(e.flags));
        assert!(port_reusable_at_once(e.flags), "the client holds TIME_WAIT");

        // The server ended the session (pg_terminate_backend, idle timeout).
        let mut e = established();
        observe(
            &mut e,
            Direction::Reply,
            seg(FIN | ACK, BACKEND_ISN + 1, CLIENT_ISN + 1, 0),
        );
        observe(
            &mut e,
            Direction::Forward,
            seg(FIN | ACK, CLIENT_ISN + 1, BACKEND_ISN + 2, 0),
        );
        assert!(is_closed(e.flags));
        assert!(
            !port_reusable_at_once(e.flags),
            "the backend holds TIME_WAIT"
        );
    }

    #[test]
    fn crossing_fins_leave_the_backend_in_time_wait() {
        // Both sent their FIN before seeing the other's: the backend's does not acknowledge
        // the client's, so the backend goes through CLOSING to TIME_WAIT.
        let mut e = established();
        observe(
            &mut e,
            Direction::Forward,
            seg(FIN | ACK, CLIENT_ISN + 1, BACKEND_ISN + 1, 0),
        );
        observe(
            &mut e,
            Direction::Reply,
            seg(FIN | ACK, BACKEND_ISN + 1, CLIENT_ISN + 1, 0),
        );
        assert!(is_closed(e.flags));
        assert!(!port_reusable_at_once(e.flags));
    }

    #[test]
    fn a_fin_outside_the_window_changes_nothing() {
        let mut e = established();
        observe(
            &mut e,
            Direction::Forward,
            seg(FIN | ACK, 5, BACKEND_ISN + 1, 0),
        );
        observe(
            &mut e,
            Direction::Reply,
            seg(FIN | ACK, 5, CLIENT_ISN + 1, 0),
        );
        assert!(!is_closing(e.flags), "blind FINs close nothing");
    }

    #[test]
    fn a_synack_of_an_older_attempt_is_a_stale_ack() {
        let mut e = opened();
        let stale = 777_777;
        observe(&mut e, Direction::Reply, seg(SYN | ACK, 4242, stale, 0));
        assert_eq!(e.flags & FLAG_SYNACK_SEEN, 0);
        assert_eq!(
            observe(&mut e, Direction::Forward, seg(RST, stale, 0, 0)),
            Observed::Tracked,
            "the client's reset of the old attempt passes"
        );
        assert!(!is_closing(e.flags));
    }

    #[test]
    fn a_fin_after_a_gap_still_counts() {
        // The client's 5-byte Terminate was lost before this host; its bare FIN passes.
        let mut e = established();
        observe(
            &mut e,
            Direction::Forward,
            seg(FIN | ACK, CLIENT_ISN + 6, BACKEND_ISN + 1, 0),
        );
        assert_ne!(e.flags & FLAG_FIN_CLIENT, 0);
        // The retransmission of a lost FIN that starts before `acked` and ends with the FIN.
        let mut e = established();
        observe(
            &mut e,
            Direction::Forward,
            seg(ACK | PSH, CLIENT_ISN + 1, BACKEND_ISN + 1, 100),
        );
        observe(
            &mut e,
            Direction::Reply,
            seg(ACK, BACKEND_ISN + 1, CLIENT_ISN + 51, 0),
        );
        observe(
            &mut e,
            Direction::Forward,
            seg(FIN | ACK, CLIENT_ISN + 1, BACKEND_ISN + 1, 100),
        );
        assert_ne!(e.flags & FLAG_FIN_CLIENT, 0);
    }

    #[test]
    fn fast_open_data_the_server_did_not_take_still_completes_the_handshake() {
        let mut e = CtEntry {
            client_seq: opened_by(&seg(SYN, CLIENT_ISN, 0, 20)),
            ..CtEntry::default()
        };
        // The server acknowledges only the SYN, not its 20 bytes.
        observe(
            &mut e,
            Direction::Reply,
            seg(SYN | ACK, BACKEND_ISN, CLIENT_ISN + 1, 0),
        );
        assert_ne!(e.flags & FLAG_SYNACK_SEEN, 0);
        // Linux resends the SYN without its data: the same attempt.
        observe(&mut e, Direction::Forward, seg(SYN, CLIENT_ISN, 0, 0));
        assert_ne!(e.flags & FLAG_SYNACK_SEEN, 0);
        assert_eq!(
            observe(
                &mut e,
                Direction::Forward,
                seg(ACK, CLIENT_ISN + 1, BACKEND_ISN + 1, 20)
            ),
            Observed::HandshakeCompleted
        );
    }

    #[test]
    fn a_stale_synack_after_the_real_one_changes_nothing() {
        let mut e = opened();
        observe(
            &mut e,
            Direction::Reply,
            seg(SYN | ACK, BACKEND_ISN, CLIENT_ISN + 1, 0),
        );
        let before = e;
        observe(&mut e, Direction::Reply, seg(SYN | ACK, 4242, 999_999, 0));
        assert_eq!(e.backend_seq, before.backend_seq);
        assert_eq!(e.flags & FLAG_STALE_ACK, 0);
    }

    #[test]
    fn a_far_off_segment_does_not_move_the_window() {
        let mut e = established();
        let before = e.client_seq;
        observe(
            &mut e,
            Direction::Forward,
            seg(
                ACK,
                CLIENT_ISN.wrapping_add(0x8000_0000),
                BACKEND_ISN + 1,
                10,
            ),
        );
        assert_eq!(e.client_seq, before);
    }

    #[test]
    fn sequence_arithmetic_wraps() {
        assert!(seq_after(5, u32::MAX - 5));
        assert!(!seq_after(u32::MAX - 5, 5));
        assert!(seq_within(2, u32::MAX - 1, 3));
        assert!(!seq_within(4, u32::MAX - 1, 3));
    }

    proptest! {
        /// Whatever arrives, in any order: a RST outside [acked, next] of its sender never
        /// closes, and a rejected segment never changes the entry.
        #[test]
        fn random_segments_never_close_without_an_in_window_rst(
            segs in proptest::collection::vec(
                (any::<bool>(), any::<u8>(), any::<u32>(), any::<u32>(), 0u32..3000), 0..24)
        ) {
            let mut e = established();
            for (fwd, flags, seq, ack, len) in segs {
                let dir = if fwd { Direction::Forward } else { Direction::Reply };
                let before = e;
                let space = if fwd { before.client_seq } else { before.backend_seq };
                let s = seg(flags, seq, ack, len);
                match observe(&mut e, dir, s) {
                    Observed::RstOutOfWindow | Observed::RstChallenged | Observed::SynOnLive => {
                        prop_assert_eq!(e, before);
                    }
                    _ => {}
                }
                if flags & RST != 0 && before.flags & FLAG_RST == 0 && e.flags & FLAG_RST != 0 {
                    prop_assert!(rst_exact(seq, &space));
                }
            }
        }
    }
}
