//! The workload's DNS server and client: `dns-serve` answers A queries over UDP (NOERROR with one
//! address for the names it knows, NXDOMAIN for the rest), `dns-query` sends queries and says what
//! came back, so tests can prove which servers a pod reaches and make the traffic the DNS
//! heuristics judge (bursts, random labels, NXDOMAIN).
//!
//! `dns-query` prints one line per query (`NAME rcode=NOERROR|NXDOMAIN|… from SERVER`, or
//! `NAME timeout`) and exits 0 if every query got an answer, 1 if any timed out, 3 on an error.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use veilnet::dns::message::{encode_answer, encode_query, Message, RCODE_NXDOMAIN};
use veilnet::duration::parse_duration;

use super::AgnhostError;

#[derive(Debug, clap::Args)]
pub struct DnsServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen: Ipv4Addr,
    /// UDP port.
    #[arg(long, default_value_t = 53)]
    pub port: u16,
    /// The address every known name resolves to.
    #[arg(long, default_value = "192.0.2.1")]
    pub address: Ipv4Addr,
    /// Names answered with `--address` (comma-separated; case-insensitive); others get
    /// NXDOMAIN. Empty: every name is known.
    #[arg(long, value_delimiter = ',')]
    pub names: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct DnsQueryArgs {
    /// The name to ask for. With `--random-prefix N`, each query asks for `<N random
    /// characters>.NAME` instead (the shape of DNS tunnelling and generated domains).
    pub name: String,
    /// The server's address (port 53 unless `--port`).
    #[arg(long)]
    pub server: std::net::IpAddr,
    #[arg(long, default_value_t = 53)]
    pub port: u16,
    /// Queries to send, one after the other.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Prefix each query's name with this many random letters and digits (at most 63).
    #[arg(long)]
    pub random_prefix: Option<usize>,
    /// How long to wait for each answer.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Pause between queries.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub interval: Duration,
}

pub fn serve(args: &DnsServeArgs) -> Result<(), AgnhostError> {
    let socket =
        UdpSocket::bind((args.listen, args.port)).map_err(|source| AgnhostError::Bind {
            proto: "udp",
            port: args.port,
            source,
        })?;
    let names: Vec<String> = args.names.iter().map(|n| normal(n)).collect();
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let query = &buf[..n];
        let Ok(m) = Message::parse(query) else {
            continue;
        };
        if m.response {
            continue;
        }
        let known = names.is_empty() || names.contains(&normal(&m.question.name));
        let reply = if known {
            encode_answer(query, 0, Some(args.address))
        } else {
            encode_answer(query, RCODE_NXDOMAIN, None)
        };
        let _ = socket.send_to(&reply, from);
    }
}

fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

fn random_label(len: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..len.min(63))
        .map(|_| char::from(CHARS[rand::random_range(0..CHARS.len())]))
        .collect()
}

/// Sends the queries; the exit code (0: every query answered, 1: some timed out).
pub fn query(args: &DnsQueryArgs) -> Result<i32, AgnhostError> {
    let server = SocketAddr::new(args.server, args.port);
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(bind).map_err(|source| AgnhostError::Bind {
        proto: "udp",
        port: 0,
        source,
    })?;
    socket
        .set_read_timeout(Some(args.timeout))
        .map_err(|e| AgnhostError::Resolve {
            target: server.to_string(),
            reason: e.to_string(),
        })?;
    let mut code = 0;
    let mut buf = vec![0u8; 4096];
    for i in 0..args.count {
        if i > 0 && !args.interval.is_zero() {
            std::thread::sleep(args.interval);
        }
        let name = match args.random_prefix {
            Some(len) => format!("{}.{}", random_label(len), args.name),
            None => args.name.clone(),
        };
        let id: u16 = rand::random();
        let q = encode_query(id, &name, 1);
        if let Err(e) = socket.send_to(&q, server) {
            println!("{name} error {e}");
            code = 1;
            continue;
        }
        let deadline = std::time::Instant::now() + args.timeout;
        let answered = loop {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => match Message::parse(&buf[..n]) {
                    Ok(m) if m.response && m.id == id => break Some((m.rcode, from)),
                    _ if std::time::Instant::now() < deadline => continue,
                    _ => break None,
                },
                Err(_) => break None,
            }
        };
        match answered {
            Some((rcode, from)) => println!("{name} rcode={} from {from}", rcode_name(rcode)),
            None => {
                println!("{name} timeout");
                code = 1;
            }
        }
    }
    Ok(code)
}
