//! Segmentation and coalescing over odd sizes, checked against a plain RFC 1071 checksum.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// RFC 1071, 16 bits at a time: the reference the fast sum is checked against.
fn reference_checksum(chunks: &[&[u8]]) -> u16 {
    let data: Vec<u8> = chunks.concat();
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let w = if pair.len() == 2 {
            u16::from_be_bytes([pair[0], pair[1]])
        } else {
            u16::from_be_bytes([pair[0], 0])
        };
        sum += u32::from(w);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    !(sum as u16)
}

fn pseudo(packet: &[u8], proto: u8, l4_len: usize) -> Vec<u8> {
    let (src, dst) = addresses(packet);
    let mut p = Vec::new();
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    if packet[0] >> 4 == 4 {
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        p.extend_from_slice(&(l4_len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
    }
    p
}

/// Verifies IP header and transport checksums of a complete packet with the reference.
fn assert_checksums_valid(packet: &[u8]) {
    let (l4, proto) = transport_offset(packet).unwrap();
    if packet[0] >> 4 == 4 {
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        assert_eq!(
            reference_checksum(&[&packet[..ihl]]),
            0,
            "IPv4 header checksum"
        );
        assert_eq!(
            usize::from(u16::from_be_bytes([packet[2], packet[3]])),
            packet.len()
        );
    } else {
        assert_eq!(
            usize::from(u16::from_be_bytes([packet[4], packet[5]])) + 40,
            packet.len()
        );
    }
    let ph = pseudo(packet, proto, packet.len() - l4);
    assert_eq!(
        reference_checksum(&[&ph, &packet[l4..]]),
        0,
        "transport checksum of a {}-byte packet",
        packet.len()
    );
    if proto == PROTO_UDP {
        assert_eq!(
            usize::from(u16::from_be_bytes([packet[l4 + 4], packet[l4 + 5]])),
            packet.len() - l4
        );
    }
}

struct Spec {
    v6: bool,
    proto: u8,
    /// IPv4 options bytes (multiple of 4) or IPv6 extension headers (raw, chained to `proto`).
    ip_extra: Vec<u8>,
    ext_first: u8,
    tcp_options: Vec<u8>,
    seq: u32,
    flags: u8,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            v6: false,
            proto: PROTO_TCP,
            ip_extra: Vec::new(),
            ext_first: 0,
            tcp_options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2], // NOP NOP timestamps
            seq: 0xfffff000,                                        // wraps inside big packets
            flags: TCP_ACK | TCP_PSH,
        }
    }
}

/// Builds a packet as the kernel would hand it over: lengths set, transport checksum either
/// complete (`partial = false`) or the pseudo-header sum only (`partial = true`, as with
/// CHECKSUM_PARTIAL).
fn build(spec: &Spec, payload: &[u8], partial: bool) -> Vec<u8> {
    let l4_hdr = if spec.proto == PROTO_TCP {
        20 + spec.tcp_options.len()
    } else {
        8
    };
    let mut p = Vec::new();
    if spec.v6 {
        p.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 0, 64]);
        let plen = spec.ip_extra.len() + l4_hdr + payload.len();
        p[4..6].copy_from_slice(&(plen as u16).to_be_bytes());
        p[6] = if spec.ip_extra.is_empty() {
            spec.proto
        } else {
            spec.ext_first
        };
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        let ihl = 20 + spec.ip_extra.len();
        p.extend_from_slice(&[0x40 | (ihl / 4) as u8, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64]);
        p.push(spec.proto);
        p.extend_from_slice(&[0, 0, 10, 99, 1, 1, 10, 99, 2, 1]);
        let total = ihl + l4_hdr + payload.len();
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    }
    p.extend_from_slice(&spec.ip_extra);
    if !spec.v6 {
        let ihl = p.len();
        ipv4_header_checksum(&mut p[..ihl]);
    }
    let l4 = p.len();
    if spec.proto == PROTO_TCP {
        p.extend_from_slice(&[0x9c, 0x40, 0x13, 0x89]);
        p.extend_from_slice(&spec.seq.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x10, 0]);
        p.push(((l4_hdr / 4) as u8) << 4);
        p.push(spec.flags);
        p.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        p.extend_from_slice(&spec.tcp_options);
    } else {
        p.extend_from_slice(&[0x9c, 0x40, 0x13, 0x89]);
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
    }
    p.extend_from_slice(payload);
    let field = l4 + if spec.proto == PROTO_TCP { 16 } else { 6 };
    let l4_len = p.len() - l4;
    let sum = if partial {
        // The kernel leaves ~csum_tcpudp_magic(...) complemented back: the folded pseudo sum.
        !reference_checksum(&[&pseudo(&p, spec.proto, l4_len)])
    } else {
        let c = reference_checksum(&[&pseudo(&p, spec.proto, l4_len), &p[l4..]]);
        if spec.proto == PROTO_UDP && c == 0 {
            0xffff
        } else {
            c
        }
    };
    p[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    p
}

fn payload(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.random()).collect()
}

fn gso_hdr(spec: &Spec, packet: &[u8], mss: usize) -> VnetHdr {
    let (l4, _) = transport_offset(packet).unwrap();
    let gso_type = match (spec.proto, spec.v6) {
        (PROTO_UDP, _) => GSO_UDP_L4,
        (_, false) => GSO_TCPV4,
        (_, true) => GSO_TCPV6,
    };
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: 0,
        gso_size: mss as u16,
        csum_start: l4 as u16,
        csum_offset: if spec.proto == PROTO_TCP { 16 } else { 6 },
    }
}

/// Segments and checks everything a receiver relies on; returns the segments.
fn segment_and_check(spec: &Spec, data: &[u8], mss: usize) -> Vec<Vec<u8>> {
    let packet = build(spec, data, true);
    let hdr = gso_hdr(spec, &packet, mss);
    let mut out = Segments::default();
    segment(&hdr, &packet, &mut out).unwrap();
    let segs: Vec<Vec<u8>> = out.iter().map(<[u8]>::to_vec).collect();
    assert_eq!(segs.len(), data.len().div_ceil(mss).max(1), "segment count");
    let (l4, _) = transport_offset(&packet).unwrap();
    let l4_hdr = if spec.proto == PROTO_TCP {
        20 + spec.tcp_options.len()
    } else {
        8
    };
    let mut joined = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        assert_checksums_valid(s);
        let body = &s[l4 + l4_hdr..];
        assert!(body.len() <= mss);
        if i + 1 < segs.len() {
            assert_eq!(body.len(), mss, "only the last segment may be short");
        }
        joined.extend_from_slice(body);
        if spec.proto == PROTO_TCP {
            let seq = u32::from_be_bytes(s[l4 + 4..l4 + 8].try_into().unwrap());
            assert_eq!(seq, spec.seq.wrapping_add((i * mss) as u32));
            let flags = s[l4 + 13];
            assert_eq!(
                flags & TCP_PSH != 0,
                i + 1 == segs.len() && spec.flags & TCP_PSH != 0
            );
            assert_eq!(flags & TCP_CWR != 0, i == 0 && spec.flags & TCP_CWR != 0);
            assert_eq!(s[l4 + 20..l4 + l4_hdr], spec.tcp_options[..]);
        }
        if !spec.v6 {
            let id = u16::from_be_bytes([s[4], s[5]]);
            assert_eq!(id, 0x1234u16.wrapping_add(i as u16));
        }
        // Headers before the transport header are copied (options / extension headers too).
        assert_eq!(s[..l4].len(), l4);
    }
    assert_eq!(joined, data, "payload survives segmentation");
    segs
}

#[test]
fn fast_checksum_matches_rfc1071_on_odd_lengths_and_splits() {
    let mut rng = StdRng::seed_from_u64(1);
    for len in (0..80).chain([1499, 1500, 65535]) {
        let data = payload(&mut rng, len);
        let split = (rng.random_range(0..=len) / 2) * 2; // even split points only
        let acc = checksum_add(checksum_add(0, &data[..split]), &data[split..]);
        assert_eq!(!fold(acc), reference_checksum(&[&data]), "len {len}");
    }
    // Carries: all-ones data.
    let ones = vec![0xffu8; 4096 + 3];
    assert_eq!(!fold(checksum_add(0, &ones)), reference_checksum(&[&ones]));
}

#[test]
fn vnet_header_round_trips() {
    let h = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV6 | GSO_ECN,
        hdr_len: 74,
        gso_size: 1388,
        csum_start: 40,
        csum_offset: 16,
    };
    let mut b = [0u8; VNET_HDR_LEN];
    h.encode(&mut b);
    assert_eq!(VnetHdr::decode(&b), Some(h));
    assert_eq!(VnetHdr::decode(&b[..9]), None);
}

#[test]
fn tso_over_odd_sizes_v4_and_v6() {
    let mut rng = StdRng::seed_from_u64(2);
    for v6 in [false, true] {
        for (len, mss) in [
            (1, 1388),
            (1388, 1388),
            (2 * 1388, 1388),
            (3 * 1388 + 1, 1388),
            (65535 - 80, 1388),
            (7, 1),
            (1000, 999),
            (536 * 5, 536),
        ] {
            let spec = Spec {
                v6,
                ..Spec::default()
            };
            segment_and_check(&spec, &payload(&mut rng, len), mss);
        }
    }
}

#[test]
fn tso_keeps_fin_on_the_last_segment_and_cwr_on_the_first() {
    let mut rng = StdRng::seed_from_u64(3);
    let spec = Spec {
        flags: TCP_ACK | TCP_FIN | TCP_CWR,
        ..Spec::default()
    };
    let segs = segment_and_check(&spec, &payload(&mut rng, 4000), 1000);
    let l4 = 20;
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(s[l4 + 13] & TCP_FIN != 0, i == segs.len() - 1);
    }
}

#[test]
fn tso_with_ipv4_options_copies_them_into_every_segment() {
    let mut rng = StdRng::seed_from_u64(4);
    let spec = Spec {
        ip_extra: vec![0x94, 0x04, 0, 0], // router alert
        ..Spec::default()
    };
    let segs = segment_and_check(&spec, &payload(&mut rng, 3000), 1400);
    for s in &segs {
        assert_eq!(s[0] & 0x0f, 6);
        assert_eq!(&s[20..24], &[0x94, 0x04, 0, 0]);
    }
}

#[test]
fn tso_with_ipv6_hop_by_hop_and_destination_options() {
    let mut rng = StdRng::seed_from_u64(5);
    // hop-by-hop (next: dest opts) + dest opts (next: TCP), 8 bytes each, PadN filled.
    let spec = Spec {
        v6: true,
        ip_extra: vec![60, 0, 1, 4, 0, 0, 0, 0, PROTO_TCP, 0, 1, 4, 0, 0, 0, 0],
        ext_first: 0,
        ..Spec::default()
    };
    let segs = segment_and_check(&spec, &payload(&mut rng, 5000), 1300);
    assert_eq!(segs.len(), 4);
}

#[test]
fn ipv6_routing_and_fragment_headers_are_refused() {
    for ext in [43u8, 44] {
        let spec = Spec {
            v6: true,
            ip_extra: vec![PROTO_TCP, 0, 0, 0, 0, 0, 0, 0],
            ext_first: ext,
            ..Spec::default()
        };
        let packet = build(&spec, &[0u8; 3000], true);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 0,
            gso_size: 1000,
            csum_start: 48,
            csum_offset: 16,
        };
        let err = segment(&hdr, &packet, &mut Segments::default()).unwrap_err();
        assert!(matches!(err, OffloadError::BadHeader(_)), "{err:?}");
    }
}

#[test]
fn uso_over_odd_sizes_v4_and_v6() {
    let mut rng = StdRng::seed_from_u64(6);
    for v6 in [false, true] {
        for (len, mss) in [(1, 1400), (1400, 1400), (2801, 1400), (60000, 1472)] {
            let spec = Spec {
                v6,
                proto: PROTO_UDP,
                ..Spec::default()
            };
            segment_and_check(&spec, &payload(&mut rng, len), mss);
        }
    }
}

#[test]
fn partial_checksum_of_a_single_packet_is_completed() {
    let mut rng = StdRng::seed_from_u64(7);
    for proto in [PROTO_TCP, PROTO_UDP] {
        for len in [0, 1, 2, 3, 1400] {
            let spec = Spec {
                proto,
                ..Spec::default()
            };
            let packet = build(&spec, &payload(&mut rng, len), true);
            let mut hdr = gso_hdr(&spec, &packet, 0);
            hdr.gso_type = GSO_NONE;
            let mut out = Segments::default();
            segment(&hdr, &packet, &mut out).unwrap();
            assert_eq!(out.len(), 1);
            let seg = out.iter().next().unwrap();
            assert_checksums_valid(seg);
            assert_eq!(seg, &build(&spec, &packet[packet.len() - len..], false)[..]);
        }
    }
    // Without NEEDS_CSUM the packet passes untouched.
    let packet = build(&Spec::default(), b"abc", false);
    let mut out = Segments::default();
    segment(&VnetHdr::default(), &packet, &mut out).unwrap();
    assert_eq!(out.iter().next().unwrap(), &packet[..]);
}

#[test]
fn udp_checksum_zero_becomes_all_ones() {
    // Find a payload whose UDP checksum computes to 0 and check it is sent as 0xffff.
    let spec = Spec {
        proto: PROTO_UDP,
        ..Spec::default()
    };
    let base = build(&spec, &[0, 0], false);
    let l4 = 20;
    let c = u16::from_be_bytes([base[l4 + 6], base[l4 + 7]]);
    // Adding `c` (one's complement) to the payload word drives the sum to all-ones => check 0.
    let packet = build(&spec, &c.to_be_bytes(), true);
    let mut hdr = gso_hdr(&spec, &packet, 0);
    hdr.gso_type = GSO_NONE;
    let mut out = Segments::default();
    segment(&hdr, &packet, &mut out).unwrap();
    let seg = out.iter().next().unwrap();
    assert_eq!(&seg[l4 + 6..l4 + 8], &[0xff, 0xff]);
    assert_checksums_valid(seg);
}

#[test]
fn malformed_offload_headers_are_errors_not_panics() {
    let spec = Spec::default();
    let packet = build(&spec, &[1u8; 3000], true);
    let good = gso_hdr(&spec, &packet, 1000);
    let mut out = Segments::default();
    let cases = [
        VnetHdr {
            gso_type: GSO_UDP,
            ..good
        },
        VnetHdr {
            gso_type: GSO_TCPV6,
            ..good
        },
        VnetHdr {
            csum_start: 24,
            ..good
        },
        VnetHdr {
            gso_size: 0,
            ..good
        },
        VnetHdr {
            gso_type: GSO_NONE,
            csum_start: 2990,
            csum_offset: 100,
            ..good
        },
    ];
    for h in cases {
        assert!(segment(&h, &packet, &mut out).is_err(), "{h:?}");
    }
    for cut in [0, 1, 19, 30, 40] {
        assert!(
            segment(&good, &packet[..cut], &mut out).is_err(),
            "cut {cut}"
        );
    }
    assert!(segment(&good, &[0x50; 64], &mut out).is_err());
}

/// Completes a coalesced packet's partial checksum as the kernel would, for comparison.
fn complete(hdr: &VnetHdr, packet: &[u8]) -> Vec<u8> {
    let mut p = packet.to_vec();
    if hdr.flags & F_NEEDS_CSUM != 0 {
        let start = usize::from(hdr.csum_start);
        let field = start + usize::from(hdr.csum_offset);
        let c = !fold(checksum_add(0, &p[start..]));
        p[field..field + 2].copy_from_slice(&c.to_be_bytes());
    }
    p
}

fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
    let mut c = Coalescer::default();
    for p in packets {
        c.push(p);
    }
    let out = c
        .packets()
        .map(|b| (VnetHdr::decode(b).unwrap(), b[VNET_HDR_LEN..].to_vec()))
        .collect();
    c.clear();
    assert!(c.is_empty());
    out
}

#[test]
fn segments_coalesce_back_into_the_original_super_packet() {
    let mut rng = StdRng::seed_from_u64(8);
    for v6 in [false, true] {
        for (len, mss) in [
            (2 * 1388, 1388),
            (3 * 1388 + 1, 1388),
            (65535 - 80, 1388),
            (5, 1),
        ] {
            let spec = Spec {
                v6,
                ..Spec::default()
            };
            let data = payload(&mut rng, len);
            let segs = segment_and_check(&spec, &data, mss);
            let out = coalesce(&segs);
            assert_eq!(out.len(), 1, "v6={v6} len={len}");
            let (hdr, packet) = &out[0];
            assert_eq!(hdr.flags, F_NEEDS_CSUM);
            assert_eq!(hdr.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!(usize::from(hdr.gso_size), mss);
            let full = complete(hdr, packet);
            assert_checksums_valid(&full);
            assert_eq!(full, build(&spec, &data, false), "v6={v6} len={len}");
            // And the kernel's view round-trips: resegmenting gives the same wire packets.
            let mut again = Segments::default();
            segment(hdr, packet, &mut again).unwrap();
            assert_eq!(again.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), segs);
        }
    }
}

#[test]
fn a_single_segment_is_written_as_is_and_marked_valid() {
    let p = build(&Spec::default(), &[9u8; 100], false);
    let out = coalesce(std::slice::from_ref(&p));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.flags, F_DATA_VALID);
    assert_eq!(out[0].0.gso_type, GSO_NONE);
    assert_eq!(out[0].1, p);
}

#[test]
fn gaps_psh_short_segments_and_other_flows_split_batches() {
    let mut rng = StdRng::seed_from_u64(9);
    let spec = Spec {
        flags: TCP_ACK,
        ..Spec::default()
    };
    let data = payload(&mut rng, 10 * 100);
    let segs = segment_and_check(&spec, &data, 100);
    // Drop segment 3: 0..3 merge, 4..10 merge.
    let mut gap = segs.clone();
    gap.remove(3);
    let out = coalesce(&gap);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].1.len(), 20 + 32 + 300);
    assert_eq!(out[1].1.len(), 20 + 32 + 600);

    // PSH on segment 4 ends the first packet there.
    let mut psh = segs.clone();
    psh[4][20 + 13] |= TCP_PSH;
    let out = coalesce(&psh);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].1.len(), 20 + 32 + 500);
    assert_ne!(out[0].1[20 + 13] & TCP_PSH, 0);

    // A short segment closes the packet even if the next one is in sequence.
    let short = segment_and_check(&spec, &data[..250], 100); // 100, 100, 50
    let tail = segment_and_check(
        &Spec {
            seq: spec.seq.wrapping_add(250),
            ..Spec::default()
        },
        &data[..100],
        100,
    );
    let out = coalesce(&[short.clone(), tail].concat());
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].1.len(), 20 + 32 + 250);

    // Two interleaved flows each merge, and keep their order.
    let other = Spec {
        v6: true,
        flags: TCP_ACK,
        ..Spec::default()
    };
    let segs6 = segment_and_check(&other, &data, 100);
    let mixed: Vec<Vec<u8>> = segs
        .iter()
        .zip(&segs6)
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    let out = coalesce(&mixed);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].1[0] >> 4, 4);
    assert_eq!(out[1].1[0] >> 4, 6);
    assert_eq!(complete(&out[0].0, &out[0].1), build(&spec, &data, false));
}

#[test]
fn unmergeable_packets_pass_through_unbatched_and_in_order() {
    let mut rng = StdRng::seed_from_u64(10);
    let data = payload(&mut rng, 300);
    let options = Spec {
        ip_extra: vec![0x94, 0x04, 0, 0],
        flags: TCP_ACK,
        ..Spec::default()
    };
    let ext = Spec {
        v6: true,
        ip_extra: vec![PROTO_TCP, 0, 1, 4, 0, 0, 0, 0],
        ext_first: 0,
        flags: TCP_ACK,
        ..Spec::default()
    };
    let syn = Spec {
        flags: TCP_SYN,
        ..Spec::default()
    };
    let udp = Spec {
        proto: PROTO_UDP,
        ..Spec::default()
    };
    for spec in [options, ext, syn, udp] {
        let a = build(&spec, &data[..100], false);
        let b = build(
            &Spec {
                seq: spec.seq.wrapping_add(100),
                ..spec
            },
            &data[100..200],
            false,
        );
        let out = coalesce(&[a.clone(), b.clone()]);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            (
                VnetHdr {
                    flags: F_DATA_VALID,
                    ..VnetHdr::default()
                },
                a
            )
        );
        assert_eq!(out[1].1, b);
    }

    // A FIN between two mergeable runs of the same flow keeps its place.
    let spec = Spec {
        flags: TCP_ACK,
        ..Spec::default()
    };
    let segs = segment_and_check(&spec, &data, 100);
    let mut fin = segs[1].clone();
    fin[20 + 13] |= TCP_FIN;
    let out = coalesce(&[segs[0].clone(), fin.clone(), segs[2].clone()]);
    assert_eq!(out.len(), 3);
    assert_eq!(out[1].1, fin);
}

#[test]
fn each_unmergeable_packet_closes_every_run_before_it_including_runs_opened_since_the_last() {
    let mut rng = StdRng::seed_from_u64(11);
    let data = payload(&mut rng, 500);
    let spec = Spec {
        flags: TCP_ACK,
        ..Spec::default()
    };
    let segs = segment_and_check(&spec, &data, 100);
    let udp = |n: u8| {
        build(
            &Spec {
                proto: PROTO_UDP,
                ..Spec::default()
            },
            &[n; 10],
            false,
        )
    };
    // A1 | X | A2 A3 (one run) | Y | A4: the run opened after X must be closed by Y too.
    let out = coalesce(&[
        segs[0].clone(),
        udp(1),
        segs[1].clone(),
        segs[2].clone(),
        udp(2),
        segs[3].clone(),
    ]);
    let lens: Vec<usize> = out.iter().map(|(_, p)| p.len()).collect();
    assert_eq!(out.len(), 5, "{lens:?}");
    assert_eq!(out[2].0.gso_size, 100, "A2 and A3 merged");
    assert_eq!(out[4].1, segs[3], "A4 stands alone");
    // Many pure unmergeable packets in one batch stay in order.
    let many: Vec<Vec<u8>> = (0..200).map(|n| udp(n as u8)).collect();
    let out = coalesce(&many);
    assert!(out.iter().map(|(_, p)| p).eq(many.iter()));
}

#[test]
fn property_random_super_packets_round_trip() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..300 {
        let v6 = rng.random_bool(0.5);
        let udp = rng.random_bool(0.2);
        let mss = rng.random_range(1..=1500);
        let max = (65535 - 100).min(mss * 120);
        let len = rng.random_range(1..=max);
        let spec = Spec {
            v6,
            proto: if udp { PROTO_UDP } else { PROTO_TCP },
            seq: rng.random(),
            flags: TCP_ACK | if rng.random_bool(0.5) { TCP_PSH } else { 0 },
            ..Spec::default()
        };
        let data = payload(&mut rng, len);
        let segs = segment_and_check(&spec, &data, mss);
        if !udp {
            let out = coalesce(&segs);
            assert_eq!(out.len(), 1);
            assert_eq!(complete(&out[0].0, &out[0].1), build(&spec, &data, false));
        }
    }
}
