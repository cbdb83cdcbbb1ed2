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

const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
const IPPROTO_TCP: u8 = 6;
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

/// Parses `[data, data_end)`. `Err` carries why the packet is not ours to touch.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Packet, Stat> {
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
    if proto != IPPROTO_TCP {
        return Err(Stat::PassNotTcp);
    }
    let tcp_start = ip_start + IP_LEN;
    if tcp_start + TCP_LEN > data_end || tot_len < IP_LEN + TCP_LEN || ip_start + tot_len > data_end
    {
        return Err(Stat::PassTruncated);
    }
    let tcp = tcp_start as *mut TcpHdr;
    // SAFETY: bounds checked above.
    if unsafe { (*tcp).doff_reserved } >> 4 < 5 {
        return Err(Stat::PassTruncated);
    }
    Ok(Packet { eth, ip, tcp })
}
