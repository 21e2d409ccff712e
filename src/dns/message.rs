//! The little of a DNS message veilnet reads (RFC 1035 §4.1): the header's flags and the first
//! question. Pure and bounded: it never panics and never loops on hostile input (names are at
//! most 255 bytes, compression pointers may only point backwards, at most 64 of them), and
//! anything it cannot read is an error, not a guess. Fuzzed (`fuzz/fuzz_targets/dns_messages.rs`).

use std::fmt::Write;

/// Why a message could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("shorter than a DNS header ({0} bytes)")]
    Short(usize),
    #[error("no question")]
    NoQuestion,
    #[error("the question's name runs past the message")]
    Truncated,
    #[error("a label of type {0:#04x} (only plain labels and compression pointers exist)")]
    LabelType(u8),
    #[error("a compression pointer that does not point backwards")]
    BadPointer,
    #[error("a name longer than 255 bytes")]
    NameTooLong,
}

/// Header fields and the first question of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    /// QR: a response (else a query).
    pub response: bool,
    pub opcode: u8,
    /// RCODE (responses: 3 is NXDOMAIN).
    pub rcode: u8,
    pub question: Question,
}

/// A question: the name as presentation text (`www.example.com`, the root as `.`; bytes outside
/// letters, digits, `-` and `_` escaped as `\DDD`, dots and backslashes in labels as `\.` and
/// `\\`), and its type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    /// The labels, as read (for the anomaly heuristics: lengths, entropy).
    pub labels: Vec<Vec<u8>>,
    pub qtype: u16,
}

pub const RCODE_NXDOMAIN: u8 = 3;
const HEADER_LEN: usize = 12;
const MAX_NAME_LEN: usize = 255;
const MAX_POINTERS: usize = 64;

impl Message {
    /// Reads a message from its first byte (a UDP payload; TCP's two-byte length prefix must be
    /// stripped first).
    pub fn parse(b: &[u8]) -> Result<Message, DnsError> {
        if b.len() < HEADER_LEN {
            return Err(DnsError::Short(b.len()));
        }
        let id = u16::from_be_bytes([b[0], b[1]]);
        let flags = u16::from_be_bytes([b[2], b[3]]);
        let qdcount = u16::from_be_bytes([b[4], b[5]]);
        if qdcount == 0 {
            return Err(DnsError::NoQuestion);
        }
        let (labels, end) = read_name(b, HEADER_LEN)?;
        let qtype = b
            .get(end..end + 2)
            .map(|t| u16::from_be_bytes([t[0], t[1]]))
            .ok_or(DnsError::Truncated)?;
        Ok(Message {
            id,
            response: flags & 0x8000 != 0,
            opcode: ((flags >> 11) & 0x0f) as u8,
            rcode: (flags & 0x000f) as u8,
            question: Question {
                name: presentation(&labels),
                labels,
                qtype,
            },
        })
    }
}

/// The labels of the name at `at`, and where the data after it starts (after the first pointer,
/// if the name is compressed).
fn read_name(b: &[u8], mut at: usize) -> Result<(Vec<Vec<u8>>, usize), DnsError> {
    let mut labels = Vec::new();
    let mut length = 1; // the root's zero byte
    let mut end = None;
    let mut pointers = 0;
    loop {
        let len = *b.get(at).ok_or(DnsError::Truncated)?;
        match len & 0xc0 {
            0x00 if len == 0 => {
                return Ok((labels, end.unwrap_or(at + 1)));
            }
            0x00 => {
                let label = b
                    .get(at + 1..at + 1 + usize::from(len))
                    .ok_or(DnsError::Truncated)?;
                length += 1 + label.len();
                if length > MAX_NAME_LEN {
                    return Err(DnsError::NameTooLong);
                }
                labels.push(label.to_vec());
                at += 1 + usize::from(len);
            }
            0xc0 => {
                let low = *b.get(at + 1).ok_or(DnsError::Truncated)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, low]));
                pointers += 1;
                if target >= at || pointers > MAX_POINTERS {
                    return Err(DnsError::BadPointer);
                }
                end.get_or_insert(at + 2);
                at = target;
            }
            other => return Err(DnsError::LabelType(other)),
        }
    }
}

fn presentation(labels: &[Vec<u8>]) -> String {
    if labels.is_empty() {
        return ".".into();
    }
    let mut s = String::new();
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        for &c in label {
            match c {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => s.push(char::from(c)),
                b'.' | b'\\' => {
                    s.push('\\');
                    s.push(char::from(c));
                }
                _ => {
                    let _ = write!(s, "\\{c:03}");
                }
            }
        }
    }
    s
}

/// The mnemonic of a query type (`A`, `AAAA`, …), else `TYPE<n>` (RFC 3597).
pub fn qtype_name(qtype: u16) -> String {
    let known = match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        10 => "NULL",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        43 => "DS",
        48 => "DNSKEY",
        64 => "SVCB",
        65 => "HTTPS",
        255 => "ANY",
        _ => return format!("TYPE{qtype}"),
    };
    known.to_string()
}

/// A query for `name` (dot-separated) of type `qtype`, as a stub resolver sends it: for tests and
/// the lab's DNS client.
pub fn encode_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    encode_name(&mut b, name);
    b.extend_from_slice(&qtype.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes()); // IN
    b
}

fn encode_name(b: &mut Vec<u8>, name: &str) {
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        let label = &label.as_bytes()[..label.len().min(63)];
        b.push(label.len() as u8);
        b.extend_from_slice(label);
    }
    b.push(0);
}

/// The answer to `query` (a message [`Message::parse`] read): the question echoed, with `rcode`
/// and, for an A question answered with NOERROR, one A record of `address`.
pub fn encode_answer(query: &[u8], rcode: u8, address: Option<std::net::Ipv4Addr>) -> Vec<u8> {
    let Ok(q) = Message::parse(query) else {
        return Vec::new();
    };
    let answer = address.filter(|_| rcode == 0 && q.question.qtype == 1);
    let mut b = Vec::new();
    b.extend_from_slice(&q.id.to_be_bytes());
    let flags: u16 = 0x8000 | 0x0400 | 0x0100 | 0x0080 | u16::from(rcode & 0x0f); // QR AA RD RA
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&u16::from(answer.is_some()).to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    let question_start = b.len();
    encode_name(&mut b, &labels_text(&q.question.labels));
    b.extend_from_slice(&q.question.qtype.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    if let Some(ip) = answer {
        b.extend_from_slice(&(0xc000u16 | question_start as u16).to_be_bytes());
        b.extend_from_slice(&[0, 1, 0, 1]); // A, IN
        b.extend_from_slice(&30u32.to_be_bytes()); // TTL
        b.extend_from_slice(&4u16.to_be_bytes());
        b.extend_from_slice(&ip.octets());
    }
    b
}

/// Labels joined with dots, bytes kept (for re-encoding what was read).
fn labels_text(labels: &[Vec<u8>]) -> String {
    labels
        .iter()
        .map(|l| String::from_utf8_lossy(l).replace('.', "-"))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_and_its_answer_round_trip() {
        let q = encode_query(0x1234, "www.Example.com.", 28);
        let m = Message::parse(&q).unwrap();
        assert_eq!(m.id, 0x1234);
        assert!(!m.response);
        assert_eq!(m.question.name, "www.Example.com");
        assert_eq!(m.question.qtype, 28);
        assert_eq!(qtype_name(m.question.qtype), "AAAA");
        let a = encode_answer(&q, RCODE_NXDOMAIN, None);
        let r = Message::parse(&a).unwrap();
        assert!(r.response);
        assert_eq!(r.rcode, RCODE_NXDOMAIN);
        assert_eq!(r.question.name, "www.Example.com");
        let ok = encode_answer(&encode_query(7, "a.b", 1), 0, Some([10, 0, 0, 1].into()));
        assert_eq!(&ok[ok.len() - 4..], &[10, 0, 0, 1]);
        assert_eq!(Message::parse(&ok).unwrap().rcode, 0);
    }

    #[test]
    fn odd_bytes_are_escaped_and_the_root_is_a_dot() {
        let mut q = encode_query(1, "x", 1);
        // Replace the name with one label `a.b\<0xff>` and one `c`.
        q.truncate(12);
        q.extend_from_slice(&[4, b'a', b'.', b'\\', 0xff, 1, b'c', 0, 0, 16, 0, 1]);
        let m = Message::parse(&q).unwrap();
        assert_eq!(m.question.name, "a\\.\\\\\\255.c");
        assert_eq!(qtype_name(m.question.qtype), "TXT");
        let root = [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1];
        assert_eq!(Message::parse(&root).unwrap().question.name, ".");
        assert_eq!(qtype_name(4242), "TYPE4242");
    }

    #[test]
    fn compression_pointers_must_point_backwards() {
        let mut b = vec![0u8; 12];
        b[5] = 1;
        // A pointer to itself: a loop, refused.
        b.extend_from_slice(&[0xc0, 12, 0, 1]);
        assert_eq!(Message::parse(&b), Err(DnsError::BadPointer));
        // Forward pointer: refused too.
        b.truncate(12);
        b.extend_from_slice(&[0xc0, 20, 0, 1, 0, 0, 0, 0, 1, b'a', 0]);
        assert_eq!(Message::parse(&b), Err(DnsError::BadPointer));
        // A backward pointer into a name in the header area is read (the bytes there are labels).
        let mut c = vec![0, 0, 0, 0, 0, 1, 1, b'z', 0, 0, 0, 0];
        c.extend_from_slice(&[1, b'y', 0xc0, 6, 0, 1, 0, 1]);
        assert_eq!(Message::parse(&c).unwrap().question.name, "y.z");
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert_eq!(Message::parse(&[0; 5]), Err(DnsError::Short(5)));
        assert_eq!(Message::parse(&[0; 12]), Err(DnsError::NoQuestion));
        let mut b = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 5, b'a'];
        assert_eq!(Message::parse(&b), Err(DnsError::Truncated));
        b.truncate(12);
        b.extend_from_slice(&[0x40, 0]);
        assert_eq!(Message::parse(&b), Err(DnsError::LabelType(0x40)));
        b.truncate(12);
        for _ in 0..5 {
            b.push(63);
            b.extend_from_slice(&[b'x'; 63]);
        }
        b.push(0);
        assert_eq!(Message::parse(&b), Err(DnsError::NameTooLong));
        // No qtype after the name.
        assert_eq!(
            Message::parse(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(DnsError::Truncated)
        );
    }
}
