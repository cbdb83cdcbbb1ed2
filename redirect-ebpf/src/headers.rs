//! Strict parsing of Ethernet / IPv4 (IHL 5) / TCP. Anything else is handed to the stack
//! untouched, with the reason counted.

use redirect_common::stats::Stat;

/// Ethernet II header.
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type_be: u16,
}

/// IPv4 header without options.
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

/// TCP header without options (options are never touched).
#[repr(C)]
pub struct TcpHdr {
    pub sport_be: u16,
    pub dport_be: u16,
    pub seq_be: u32,
    pub ack_seq_be: u32,
    pub doff_reserved: u8,
    pub flags: u8,
    pub window_be: u16,
    pub check: u16,
    pub urg_ptr_be: u16,
}

/// ICMP header; `rest_be` is "unused" plus, for fragmentation-needed, the next-hop MTU.
#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    pub rest_be: u32,
}

/// The first 8 bytes of the TCP header an ICMP error quotes (all RFC 792 guarantees).
#[repr(C)]
#[expect(
    clippy::struct_field_names,
    reason = "every field is in network byte order, and says so"
)]
pub struct QuotedTcp {
    pub sport_be: u16,
    pub dport_be: u16,
    pub seq_be: u32,
}

const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_LEN: usize = core::mem::size_of::<IcmpHdr>();
pub const QUOTED_LEN: usize = core::mem::size_of::<QuotedTcp>();
/// More-fragments flag and fragment offset: either set means a fragment.
const IP_MF_OFFSET_MASK_BE: u16 = 0x3fffu16.to_be();

pub const ETH_LEN: usize = core::mem::size_of::<EthHdr>();
pub const IP_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
pub const TCP_LEN: usize = core::mem::size_of::<TcpHdr>();

/// Pointers into the packet, all bounds-checked against `data_end`.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub tcp: *mut TcpHdr,
}

/// An ICMP error (destination unreachable, time exceeded) quoting a TCP/IPv4 packet: what
/// PMTU discovery runs on. Pointers bounds-checked against `data_end`.
pub struct IcmpError {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    pub icmp: *mut IcmpHdr,
    pub inner_ip: *mut Ipv4Hdr,
    pub inner_tcp: *mut QuotedTcp,
}

/// What the datapath handles.
pub enum Parsed {
    Tcp(Packet),
    IcmpError(IcmpError),
}

/// Parses the headers in `[data, data_end)`, of a frame `frame_len` bytes long (beyond
/// `data_end` when a socket buffer keeps its payload in pages). `Err` carries why the packet
/// is not ours to touch.
#[inline(always)]
pub fn parse(data: usize, data_end: usize, frame_len: usize) -> Result<Parsed, Stat> {
    if data + ETH_LEN > data_end {
        return Err(Stat::PassTruncated);
    }
    let eth = data as *mut EthHdr;
    // SAFETY: bounds checked above.
    if unsafe { (*eth).ether_type_be } != ETH_P_IPV4_BE {
        return Err(Stat::PassNotIpv4);
    }
    let ip_start = data + ETH_LEN;
    if ip_start + IP_LEN > data_end {
        return Err(Stat::PassTruncated);
    }
    let ip = ip_start as *mut Ipv4Hdr;
    // SAFETY: bounds checked above.
    let (version_ihl, frag, proto, tot_len) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).frag_off_be,
            (*ip).protocol,
            u16::from_be((*ip).tot_len_be) as usize,
        )
    };
    if version_ihl >> 4 != 4 {
        return Err(Stat::PassNotIpv4);
    }
    if version_ihl & 0x0f != 5 {
        // Options shift the TCP header; a constant L4 offset keeps the verifier and the code
        // simple, and PostgreSQL clients do not send IP options (Katran drops them).
        return Err(Stat::PassIpOptions);
    }
    if frag & IP_MF_OFFSET_MASK_BE != 0 {
        return Err(Stat::PassFragment);
    }
    if proto == IPPROTO_ICMP {
        return parse_icmp_error(eth, ip, ip_start + IP_LEN, data_end).map(Parsed::IcmpError);
    }
    if proto != IPPROTO_TCP {
        return Err(Stat::PassNotTcp);
    }
    let tcp_start = ip_start + IP_LEN;
    if tcp_start + TCP_LEN > data_end || tot_len < IP_LEN + TCP_LEN || ETH_LEN + tot_len > frame_len
    {
        return Err(Stat::PassTruncated);
    }
    let tcp = tcp_start as *mut TcpHdr;
    // SAFETY: bounds checked above.
    if unsafe { (*tcp).doff_reserved } >> 4 < 5 {
        return Err(Stat::PassTruncated);
    }
    Ok(Parsed::Tcp(Packet { eth, ip, tcp }))
}

/// An ICMP error quoting an unfragmented TCP/IPv4 packet without IP options; anything else
/// (echo, other types, quotes we cannot read) passes untouched.
#[inline(always)]
fn parse_icmp_error(
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    icmp_start: usize,
    data_end: usize,
) -> Result<IcmpError, Stat> {
    let inner_start = icmp_start + ICMP_LEN;
    let quoted_start = inner_start + IP_LEN;
    if quoted_start + QUOTED_LEN > data_end {
        return Err(Stat::PassNotTcp);
    }
    let icmp = icmp_start as *mut IcmpHdr;
    let inner_ip = inner_start as *mut Ipv4Hdr;
    // SAFETY: bounds checked above.
    let (kind, version_ihl, frag, proto) = unsafe {
        (
            (*icmp).kind,
            (*inner_ip).version_ihl,
            (*inner_ip).frag_off_be,
            (*inner_ip).protocol,
        )
    };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return Err(Stat::PassNotTcp);
    }
    if version_ihl != 0x45 || frag & IP_MF_OFFSET_MASK_BE != 0 || proto != IPPROTO_TCP {
        return Err(Stat::PassNotTcp);
    }
    Ok(IcmpError {
        eth,
        ip,
        icmp,
        inner_ip,
        inner_tcp: quoted_start as *mut QuotedTcp,
    })
}
