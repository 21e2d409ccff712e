//! TUN offloads, done in userspace: segmentation of the kernel's super-packets before encryption
//! and coalescing (GRO) of decrypted packets before they are written back.
//!
//! With `IFF_VNET_HDR` and `TUNSETOFFLOAD`, every packet on the TUN carries a `virtio_net_hdr`.
//! Outgoing, the kernel hands over TCP (TSO) and UDP (USO) packets of up to 64 KiB plus the
//! segment size, with the transport checksum left partial; [`segment`] cuts them into wire-sized
//! IP packets with complete checksums, because encryption hides them from any later offload.
//! Incoming, [`Coalescer`] merges consecutive in-order TCP segments of one flow back into one
//! super-packet with a partial checksum, so the kernel's stack handles one packet per 64 KiB
//! instead of ~45. Anything it cannot merge safely (IPv4 options or fragments, IPv6 extension
//! headers, SYN/FIN/RST/URG, a gap in sequence numbers) is written as it is, one packet per write.
//!
//! Everything here is pure (byte slices in, byte slices out), so it is tested without a TUN.

use std::ops::Range;

/// Size of the `struct virtio_net_hdr` every TUN read and write starts with (the default
/// `TUNSETVNETHDRSZ`).
pub(crate) const VNET_HDR_LEN: usize = 10;

pub(crate) const F_NEEDS_CSUM: u8 = 1;
/// The transport checksum is known good: set on decrypted packets, which WireGuard has already
/// authenticated (as the kernel's WireGuard does with `CHECKSUM_UNNECESSARY`).
pub(crate) const F_DATA_VALID: u8 = 2;

pub(crate) const GSO_NONE: u8 = 0;
pub(crate) const GSO_TCPV4: u8 = 1;
/// UFO (IP-fragmented UDP): never enabled, refused if seen.
#[cfg(test)]
pub(crate) const GSO_UDP: u8 = 3;
pub(crate) const GSO_TCPV6: u8 = 4;
pub(crate) const GSO_UDP_L4: u8 = 5;
pub(crate) const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;

/// Largest IP packet the coalescer builds (IPv4's total-length limit).
const MAX_COALESCED: usize = 65535;

/// `struct virtio_net_hdr` (legacy layout, native endian as the TUN driver uses it by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub(crate) fn decode(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub(crate) fn encode(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

// ---- Internet checksum ---------------------------------------------------------------------------

/// Adds `data` to a one's-complement accumulator. `data` must start at an even offset of the
/// checksummed region; `acc` and the result are in network byte order (fold to get the sum).
///
/// Why this shape: the one's-complement sum does not care about byte order (RFC 1071 §2(B)), so
/// the words are read little-endian, as the CPU loads them, summed as u32s into independent u64
/// lanes that cannot overflow (2^32 words would be 16 GiB), and the 16-bit result is swapped
/// once at the end. The compiler turns the loop into vector adds; it runs at memory speed, where
/// the carry-chained big-endian version spent ~3 % of the datapath's CPU.
pub(crate) fn checksum_add(acc: u64, data: &[u8]) -> u64 {
    const LANES: usize = 8;
    let mut lanes = [0u64; LANES];
    let mut blocks = data.chunks_exact(4 * LANES);
    for block in &mut blocks {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(4)) {
            *lane += u64::from(u32::from_le_bytes([word[0], word[1], word[2], word[3]]));
        }
    }
    let mut sum: u64 = lanes.iter().map(|&l| fold32(l)).sum();
    let mut words = blocks.remainder().chunks_exact(4);
    for word in &mut words {
        sum += u64::from(u32::from_le_bytes([word[0], word[1], word[2], word[3]]));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        // A short tail is zero-padded at its end, as RFC 1071 pads an odd last byte.
        let mut b = [0u8; 4];
        b[..rest.len()].copy_from_slice(rest);
        sum += u64::from(u32::from_le_bytes(b));
    }
    // Little-endian 16-bit sum -> network order.
    let native = fold(sum);
    let (s, carry) = acc.overflowing_add(u64::from(native.swap_bytes()));
    s + u64::from(carry)
}

/// Folds a lane to at most 33 bits so that eight of them add without overflow.
fn fold32(x: u64) -> u64 {
    (x & 0xffff_ffff) + (x >> 32)
}

/// Folds an accumulator to 16 bits (not complemented).
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of TCP/UDP over IPv4 or IPv6 (`src`/`dst` are 4 or 16 bytes).
pub(crate) fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u64 {
    let acc = checksum_add(0, src);
    let acc = checksum_add(acc, dst);
    acc + u64::from(proto) + l4_len as u64
}

fn ipv4_header_checksum(header: &mut [u8]) {
    header[10] = 0;
    header[11] = 0;
    let c = !fold(checksum_add(0, header));
    header[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Source and destination address bytes of an IPv4 or IPv6 packet.
fn addresses(packet: &[u8]) -> (&[u8], &[u8]) {
    if packet[0] >> 4 == 4 {
        (&packet[12..16], &packet[16..20])
    } else {
        (&packet[8..24], &packet[24..40])
    }
}

// ---- Segmentation (TUN → network) ------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OffloadError {
    #[error("packet shorter than its headers")]
    Truncated,
    #[error("unsupported GSO type {0:#x}")]
    UnsupportedGso(u8),
    #[error("inconsistent offload header: {0}")]
    BadHeader(&'static str),
}

/// Reusable output of [`segment`]: the packets, back to back in one buffer.
#[derive(Debug, Default)]
pub(crate) struct Segments {
    buf: Vec<u8>,
    ranges: Vec<Range<usize>>,
}

impl Segments {
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.ranges.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &[u8]> + Clone {
        self.ranges.iter().map(|r| &self.buf[r.clone()])
    }

    fn push(&mut self, parts: &[&[u8]]) -> Range<usize> {
        let start = self.buf.len();
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        let r = start..self.buf.len();
        self.ranges.push(r.clone());
        r
    }
}

/// Where the transport header starts, checked against the IP header chain: the offset the
/// kernel's `csum_start` names must be reachable through headers we understand, so that the
/// length fields we rewrite are the right ones. Returns `(l4_offset, l4_protocol)`.
fn transport_offset(packet: &[u8]) -> Result<(usize, u8), OffloadError> {
    let version = packet.first().ok_or(OffloadError::Truncated)? >> 4;
    match version {
        4 => {
            if packet.len() < 20 {
                return Err(OffloadError::Truncated);
            }
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return Err(OffloadError::BadHeader("IPv4 header length"));
            }
            let frag = u16::from_be_bytes([packet[6], packet[7]]);
            if frag & 0x3fff != 0 {
                return Err(OffloadError::BadHeader("IPv4 fragment"));
            }
            Ok((ihl, packet[9]))
        }
        6 => {
            if packet.len() < 40 {
                return Err(OffloadError::Truncated);
            }
            let mut next = packet[6];
            let mut off = 40;
            loop {
                match next {
                    // Hop-by-hop and destination options: length in 8-byte units, plus 8.
                    0 | 60 => {
                        let h = packet.get(off..off + 2).ok_or(OffloadError::Truncated)?;
                        next = h[0];
                        off += usize::from(h[1]) * 8 + 8;
                    }
                    // A routing header changes the destination the pseudo-header must use, and
                    // a fragment header means no segmentation: refuse both.
                    43 => return Err(OffloadError::BadHeader("IPv6 routing header")),
                    44 => return Err(OffloadError::BadHeader("IPv6 fragment header")),
                    proto => return Ok((off, proto)),
                }
                if off > packet.len() {
                    return Err(OffloadError::Truncated);
                }
            }
        }
        _ => Err(OffloadError::BadHeader("not IPv4 or IPv6")),
    }
}

/// Fixes the IP length field (and IPv4 header checksum and ID) of a segment's header copy.
fn fix_ip_header(ip: &mut [u8], l4_off: usize, l4_len: usize, id_increment: u16) {
    if ip[0] >> 4 == 4 {
        let total = (l4_off + l4_len) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let id = u16::from_be_bytes([ip[4], ip[5]]).wrapping_add(id_increment);
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        ipv4_header_checksum(&mut ip[..ihl]);
    } else {
        let payload = (l4_off - 40 + l4_len) as u16;
        ip[4..6].copy_from_slice(&payload.to_be_bytes());
    }
}

/// Writes the complete transport checksum of the segment at `range` in `buf`.
fn finish_l4_checksum(buf: &mut [u8], l4_off: usize, proto: u8, field: usize) {
    let (src, dst) = addresses(buf);
    let l4_len = buf.len() - l4_off;
    let pseudo = pseudo_header_sum(src, dst, proto, l4_len);
    buf[l4_off + field] = 0;
    buf[l4_off + field + 1] = 0;
    let mut c = !fold(checksum_add(pseudo, &buf[l4_off..]));
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    buf[l4_off + field..l4_off + field + 2].copy_from_slice(&c.to_be_bytes());
}

/// Turns one packet read from the TUN (its `virtio_net_hdr` already split off) into wire-ready
/// IP packets in `out`: TSO/USO super-packets are cut into `gso_size` pieces with fixed headers
/// and full checksums; a plain packet with a partial checksum gets it completed.
pub(crate) fn segment(
    hdr: &VnetHdr,
    packet: &[u8],
    out: &mut Segments,
) -> Result<(), OffloadError> {
    out.clear();
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        let r = out.push(&[packet]);
        if hdr.flags & F_NEEDS_CSUM != 0 {
            let start = usize::from(hdr.csum_start);
            let field = start + usize::from(hdr.csum_offset);
            if field + 2 > packet.len() {
                return Err(OffloadError::BadHeader("checksum offset beyond the packet"));
            }
            let p = &mut out.buf[r];
            // The field holds the pseudo-header sum; summing over it completes the checksum.
            let mut c = !fold(checksum_add(0, &p[start..]));
            if hdr.csum_offset == 6 && c == 0 {
                c = 0xffff; // UDP's "no checksum" value is not a valid result
            }
            p[field..field + 2].copy_from_slice(&c.to_be_bytes());
        }
        return Ok(());
    }
    let (l4_off, proto) = transport_offset(packet)?;
    let version = packet[0] >> 4;
    let (want_proto, want_version) = match gso {
        GSO_TCPV4 => (PROTO_TCP, 4),
        GSO_TCPV6 => (PROTO_TCP, 6),
        GSO_UDP_L4 => (PROTO_UDP, version),
        other => return Err(OffloadError::UnsupportedGso(other)),
    };
    if proto != want_proto || version != want_version {
        return Err(OffloadError::BadHeader(
            "GSO type does not match the packet",
        ));
    }
    if usize::from(hdr.csum_start) != l4_off {
        return Err(OffloadError::BadHeader(
            "csum_start is not the transport header",
        ));
    }
    let l4_hdr_len = if proto == PROTO_TCP {
        let b = packet.get(l4_off + 12).ok_or(OffloadError::Truncated)?;
        let len = usize::from(b >> 4) * 4;
        if len < 20 {
            return Err(OffloadError::BadHeader("TCP header length"));
        }
        len
    } else {
        8
    };
    let hdr_total = l4_off + l4_hdr_len;
    if packet.len() < hdr_total {
        return Err(OffloadError::Truncated);
    }
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(OffloadError::BadHeader("zero gso_size"));
    }
    let headers = &packet[..hdr_total];
    let payload = &packet[hdr_total..];
    let count = payload.len().div_ceil(mss).max(1);
    let seq0 = if proto == PROTO_TCP {
        u32::from_be_bytes([
            packet[l4_off + 4],
            packet[l4_off + 5],
            packet[l4_off + 6],
            packet[l4_off + 7],
        ])
    } else {
        0
    };
    for i in 0..count {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        let r = out.push(&[headers, chunk]);
        let seg = &mut out.buf[r];
        let l4_len = l4_hdr_len + chunk.len();
        fix_ip_header(seg, l4_off, l4_len, i as u16);
        if proto == PROTO_TCP {
            let seq = seq0.wrapping_add((i * mss) as u32);
            seg[l4_off + 4..l4_off + 8].copy_from_slice(&seq.to_be_bytes());
            let flags = &mut seg[l4_off + 13];
            if i + 1 < count {
                *flags &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                *flags &= !TCP_CWR;
            }
            finish_l4_checksum(seg, l4_off, PROTO_TCP, 16);
        } else {
            seg[l4_off + 4..l4_off + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            finish_l4_checksum(seg, l4_off, PROTO_UDP, 6);
        }
    }
    Ok(())
}

// ---- Coalescing (network → TUN) --------------------------------------------------------------------

/// The parts of a TCP segment the coalescer compares.
#[derive(Debug, Clone, Copy)]
struct TcpSegment {
    v6: bool,
    /// IP header length (20 or 40: packets with options/extension headers are not merged).
    ip_len: usize,
    /// TCP header length, options included.
    tcp_len: usize,
    seq: u32,
    flags: u8,
    payload_len: usize,
}

/// Parses `packet` as a TCP segment the coalescer may merge: IPv4 without options and not a
/// fragment (DF set, so IP IDs carry no meaning), or IPv6 without extension headers; ACK set and
/// no SYN/FIN/RST/URG; non-empty payload; consistent lengths.
fn mergeable_tcp(packet: &[u8]) -> Option<TcpSegment> {
    let version = packet.first()? >> 4;
    let (v6, ip_len, total) = match version {
        4 if packet.len() >= 20 && packet[0] & 0x0f == 5 && packet[9] == PROTO_TCP => {
            let frag = u16::from_be_bytes([packet[6], packet[7]]);
            if frag != 0x4000 {
                return None; // DF only: no fragments, no MF
            }
            (
                false,
                20,
                usize::from(u16::from_be_bytes([packet[2], packet[3]])),
            )
        }
        6 if packet.len() >= 40 && packet[6] == PROTO_TCP => (
            true,
            40,
            40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])),
        ),
        _ => return None,
    };
    if total != packet.len() || packet.len() < ip_len + 20 {
        return None;
    }
    let tcp = &packet[ip_len..];
    let tcp_len = usize::from(tcp[12] >> 4) * 4;
    if tcp_len < 20 || ip_len + tcp_len >= packet.len() {
        return None;
    }
    let flags = tcp[13];
    if flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    Some(TcpSegment {
        v6,
        ip_len,
        tcp_len,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags,
        payload_len: packet.len() - ip_len - tcp_len,
    })
}

/// A packet being assembled for one TUN write.
#[derive(Debug)]
struct Pending {
    /// `virtio_net_hdr` + IP packet.
    buf: Vec<u8>,
    merge: Option<Merge>,
}

/// State of a pending TCP super-packet.
#[derive(Debug)]
struct Merge {
    seg: TcpSegment,
    gso_size: usize,
    count: usize,
    next_seq: u32,
    /// No more segments may follow (a short segment or PSH ended it).
    closed: bool,
}

impl Merge {
    /// Whether `packet` (parsed as `s`) continues this super-packet.
    fn accepts(&self, head: &[u8], s: &TcpSegment, packet: &[u8]) -> bool {
        let m = &self.seg;
        if self.closed
            || s.v6 != m.v6
            || s.tcp_len != m.tcp_len
            || s.seq != self.next_seq
            || s.payload_len > self.gso_size
            || head.len() + s.payload_len > MAX_COALESCED
        {
            return false;
        }
        let (ip_a, ip_b) = (&head[..m.ip_len], &packet[..s.ip_len]);
        let same_ip = if m.v6 {
            // version/class/flow label, next header, hop limit, addresses (not the length)
            ip_a[..4] == ip_b[..4] && ip_a[6..40] == ip_b[6..40]
        } else {
            // TOS, flags/fragment, TTL, protocol, addresses (not length, ID or checksum)
            ip_a[1] == ip_b[1] && ip_a[6..10] == ip_b[6..10] && ip_a[12..20] == ip_b[12..20]
        };
        let (tcp_a, tcp_b) = (&head[m.ip_len..], &packet[s.ip_len..]);
        // Ports, ACK number, data offset, window and options equal; flags may differ only in
        // PSH (and CWR, which a later segment never carries).
        let same_tcp = tcp_a[..4] == tcp_b[..4]
            && tcp_a[8..13] == tcp_b[8..13]
            && (tcp_a[13] ^ tcp_b[13]) & !TCP_PSH == 0
            && tcp_a[14..16] == tcp_b[14..16]
            && tcp_a[20..m.tcp_len] == tcp_b[20..s.tcp_len];
        same_ip && same_tcp
    }
}

/// Merges decrypted packets into as few TUN writes as possible, preserving their order per flow.
/// Push a batch, write out [`Coalescer::packets`], then [`Coalescer::clear`] (buffers are reused).
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    pending: Vec<Pending>,
    /// Every pending packet below this index is closed to merging already, so closing them all
    /// again (each unmergeable packet does) starts here: linear, not quadratic, in a batch of
    /// pure ACKs.
    closed_below: usize,
    spare: Vec<Vec<u8>>,
}

impl Coalescer {
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn new_pending(&mut self, packet: &[u8], merge: Option<Merge>) {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.reserve(VNET_HDR_LEN + MAX_COALESCED);
        buf.extend_from_slice(&[0u8; VNET_HDR_LEN]);
        buf.extend_from_slice(packet);
        self.pending.push(Pending { buf, merge });
    }

    /// Adds one decrypted IP packet.
    pub(crate) fn push(&mut self, packet: &[u8]) {
        let Some(s) = mergeable_tcp(packet) else {
            // Rare (handshakes, FINs, options): nothing pending may grow past it, which keeps
            // every flow in order without working out which flow it belongs to.
            for p in &mut self.pending[self.closed_below..] {
                if let Some(m) = p.merge.as_mut() {
                    m.closed = true;
                }
            }
            self.new_pending(packet, None);
            self.closed_below = self.pending.len();
            return;
        };
        // Only the latest pending packet of the same flow may be extended: appending to an older
        // one would reorder the flow. Flows are told apart by addresses and ports.
        let (src, dst) = addresses(packet);
        let ports = &packet[s.ip_len..s.ip_len + 4];
        let same_flow = |buf: &[u8], m: &Merge| {
            let ip = &buf[VNET_HDR_LEN..];
            let (a, b) = addresses(ip);
            m.seg.v6 == s.v6 && a == src && b == dst && &ip[m.seg.ip_len..m.seg.ip_len + 4] == ports
        };
        // Only pending packets with merge state are candidates, so the match hands that state
        // over directly: there is no "it was checked before" invariant to rely on here.
        let latest = self.pending.iter_mut().rev().find_map(|p| match p {
            Pending {
                buf,
                merge: Some(m),
            } if same_flow(buf, m) => Some((buf, m)),
            _ => None,
        });
        if let Some((buf, m)) = latest {
            if m.accepts(&buf[VNET_HDR_LEN..], &s, packet) {
                buf.extend_from_slice(&packet[s.ip_len + s.tcp_len..]);
                m.count += 1;
                m.next_seq = s.seq.wrapping_add(s.payload_len as u32);
                if s.payload_len < m.gso_size {
                    m.closed = true;
                }
                if s.flags & TCP_PSH != 0 {
                    buf[VNET_HDR_LEN + m.seg.ip_len + 13] |= TCP_PSH;
                    m.closed = true;
                }
                return;
            }
        }
        let merge = Merge {
            seg: s,
            gso_size: s.payload_len,
            count: 1,
            next_seq: s.seq.wrapping_add(s.payload_len as u32),
            closed: s.flags & TCP_PSH != 0,
        };
        self.new_pending(packet, Some(merge));
    }

    /// Finalises headers and returns the TUN writes (each `virtio_net_hdr` + packet), in order.
    pub(crate) fn packets(&mut self) -> impl Iterator<Item = &[u8]> {
        for p in &mut self.pending {
            let hdr = match &p.merge {
                Some(m) if m.count > 1 => {
                    let ip = &mut p.buf[VNET_HDR_LEN..];
                    let ip_len = m.seg.ip_len;
                    let l4_len = ip.len() - ip_len;
                    fix_ip_header(ip, ip_len, l4_len, 0);
                    // Partial checksum: the pseudo-header sum, which the kernel completes (or
                    // offloads) over the data when it resegments or delivers.
                    let (src, dst) = addresses(ip);
                    let pseudo = fold(pseudo_header_sum(src, dst, PROTO_TCP, l4_len));
                    ip[ip_len + 16..ip_len + 18].copy_from_slice(&pseudo.to_be_bytes());
                    VnetHdr {
                        flags: F_NEEDS_CSUM,
                        gso_type: if m.seg.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                        hdr_len: (ip_len + m.seg.tcp_len) as u16,
                        gso_size: m.gso_size as u16,
                        csum_start: ip_len as u16,
                        csum_offset: 16,
                    }
                }
                _ => VnetHdr {
                    flags: F_DATA_VALID,
                    ..VnetHdr::default()
                },
            };
            hdr.encode(&mut p.buf[..VNET_HDR_LEN]);
        }
        self.pending.iter().map(|p| p.buf.as_slice())
    }

    pub(crate) fn clear(&mut self) {
        for p in self.pending.drain(..) {
            self.spare.push(p.buf);
        }
        self.closed_below = 0;
    }
}

#[cfg(test)]
mod tests;
