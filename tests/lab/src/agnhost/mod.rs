//! The built-in test workload, in the spirit of Kubernetes' agnhost: `serve` answers on TCP and UDP
//! ports, `connect` asks once and tells whether the peer answered; `dns-serve` and `dns-query`
//! ([`dns`]) are a DNS server and client.
//!
//! Both protocols are real request/response exchanges, so a policy drop is detectable for UDP too:
//! the client sends `veilnet-agnhost <nonce> <message>` and only counts an answer that echoes its
//! nonce. Exit codes of `connect`: 0 answered, 1 timed out (dropped), 2 refused (RST or ICMP
//! unreachable), 3 any other failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use veilnet::duration::parse_duration;

pub mod dns;

/// Requests start with this word so that stray traffic is never mistaken for a probe.
const MAGIC: &str = "veilnet-agnhost";
/// Longest request line or datagram handled (keeps a hostile client from using memory).
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgnhostError {
    #[error("nothing to serve: give --tcp and/or --udp ports")]
    NothingToServe,
    #[error("failed to bind {proto} port {port}: {source}")]
    Bind {
        proto: &'static str,
        port: u16,
        source: std::io::Error,
    },
    #[error("cannot resolve {target}: {reason}")]
    Resolve { target: String, reason: String },
}

#[derive(Debug, clap::Subcommand)]
pub enum AgnhostCommand {
    /// Answer probes on the given ports until killed.
    Serve(ServeArgs),
    /// Probe HOST:PORT once; exit 0 if it answered, 1 on timeout, 2 if refused, 3 on error.
    Connect(ConnectArgs),
    /// Open many TCP connections, send a partial HTTP request on each and hold them (the
    /// descriptor-exhaustion attack of the lab tests).
    Hold(HoldArgs),
    /// Answer DNS A queries over UDP: known names with an address, others NXDOMAIN.
    DnsServe(dns::DnsServeArgs),
    /// Send DNS queries to a server; exit 0 if each was answered, 1 if any timed out.
    DnsQuery(dns::DnsQueryArgs),
}

#[derive(Debug, clap::Args)]
pub struct HoldArgs {
    /// HOST:PORT targets; connections are spread over them in turn.
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// Connections to attempt in all.
    #[arg(long, default_value_t = 20_000)]
    pub count: usize,
    /// How long to hold them before exiting, e.g. 90s.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Threads opening connections.
    #[arg(long, default_value_t = 64)]
    pub threads: usize,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TCP ports, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub tcp: Vec<u16>,
    /// UDP ports, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub udp: Vec<u16>,
    /// Name put in every answer (defaults to $POD_NAME, then $HOSTNAME).
    #[arg(long)]
    pub name: Option<String>,
    /// Add the source address each request arrived from to the answer (`NAME from IP`) and print
    /// it on stdout (`tcp|udp from IP:PORT`), like agnhost's `/clientip`: shows masquerade, or
    /// its absence, from the receiving side.
    #[arg(long)]
    pub report_client: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// HOST:PORT to probe.
    pub target: String,
    #[arg(long, value_enum, default_value_t = Protocol::Tcp)]
    pub protocol: Protocol,
    /// How long to wait for an answer, e.g. 1s, 500ms, 2.5s.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Payload carried in the request (e.g. a marker to look for on the wire).
    #[arg(long, default_value = "")]
    pub message: String,
}

/// Outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Answered { by: String },
    TimedOut,
    Refused,
    Failed(String),
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Answered { .. } => 0,
            Outcome::TimedOut => 1,
            Outcome::Refused => 2,
            Outcome::Failed(_) => 3,
        }
    }
}

pub fn run(cmd: AgnhostCommand) -> anyhow::Result<i32> {
    match cmd {
        AgnhostCommand::Serve(args) => {
            serve(args)?;
            Ok(0)
        }
        AgnhostCommand::Hold(args) => {
            hold(&args)?;
            Ok(0)
        }
        AgnhostCommand::DnsServe(args) => {
            dns::serve(&args)?;
            Ok(0)
        }
        AgnhostCommand::DnsQuery(args) => Ok(dns::query(&args)?),
        AgnhostCommand::Connect(args) => {
            let outcome = connect(&args)?;
            match &outcome {
                Outcome::Answered { by } => println!("answered by {by}"),
                Outcome::TimedOut => {
                    eprintln!(
                        "timeout: no answer from {} within {:?}",
                        args.target, args.timeout
                    )
                }
                Outcome::Refused => eprintln!("refused: {} rejected the connection", args.target),
                Outcome::Failed(e) => eprintln!("error: {e}"),
            }
            Ok(outcome.exit_code())
        }
    }
}

/// The answer a server gives to a request line, or None for anything that is not a probe.
fn answer(request: &[u8], name: &str) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(request).ok()?;
    let mut parts = text.trim_end_matches(['\r', '\n']).splitn(3, ' ');
    if parts.next()? != MAGIC {
        return None;
    }
    let nonce = parts.next()?;
    Some(format!("{MAGIC} {nonce} {name}\n").into_bytes())
}

/// Name of the answering server from an answer line, if it echoes `nonce`.
fn parse_answer(reply: &[u8], nonce: &str) -> Option<String> {
    let text = std::str::from_utf8(reply).ok()?;
    let mut parts = text.trim_end().splitn(3, ' ');
    (parts.next()? == MAGIC && parts.next()? == nonce)
        .then(|| parts.next().unwrap_or("").to_string())
}

pub fn serve(args: ServeArgs) -> Result<(), AgnhostError> {
    if args.tcp.is_empty() && args.udp.is_empty() {
        return Err(AgnhostError::NothingToServe);
    }
    let name = args
        .name
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "agnhost".to_string());
    let mut threads = Vec::new();
    // Bind everything first, so that a bad port fails the whole command at once.
    let mut tcp = Vec::new();
    for port in args.tcp {
        let l = TcpListener::bind(("0.0.0.0", port)).map_err(|source| AgnhostError::Bind {
            proto: "tcp",
            port,
            source,
        })?;
        tcp.push(l);
    }
    let mut udp = Vec::new();
    for port in args.udp {
        let s = UdpSocket::bind(("0.0.0.0", port)).map_err(|source| AgnhostError::Bind {
            proto: "udp",
            port,
            source,
        })?;
        udp.push(s);
    }
    let report = args.report_client;
    for listener in tcp {
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            serve_tcp(listener, name, report)
        }));
    }
    for socket in udp {
        let name = name.clone();
        threads.push(std::thread::spawn(move || serve_udp(socket, name, report)));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// The name an answer carries: with `--report-client`, the client's address too (and a line on
/// stdout saying where the request came from).
fn answering_name(name: &str, report: bool, proto: &str, from: Option<SocketAddr>) -> String {
    match (report, from) {
        (true, Some(from)) => {
            // Best effort: a closed stdout must not stop the server.
            let _ = writeln!(std::io::stdout(), "{proto} from {from}");
            format!("{name} from {}", from.ip())
        }
        _ => name.to_string(),
    }
}

fn serve_tcp(listener: TcpListener, name: String, report: bool) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = answering_name(&name, report, "tcp", stream.peer_addr().ok());
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut writer = match stream.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let mut reader = BufReader::new(stream.take(MAX_MESSAGE as u64));
            let mut line = Vec::new();
            // Several probes may share one connection; answer each line.
            while let Ok(n) = reader.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                if let Some(reply) = answer(&line, &name) {
                    if writer.write_all(&reply).is_err() {
                        break;
                    }
                }
                line.clear();
            }
        });
    }
}

fn serve_udp(socket: UdpSocket, name: String, report: bool) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let name = answering_name(&name, report, "udp", Some(from));
        if let Some(reply) = answer(&buf[..n], &name) {
            let _ = socket.send_to(&reply, from);
        }
    }
}

/// Opens up to `count` connections (raising this process' descriptor limit to fit where it may), sends each a
/// partial HTTP request (headers never finished), prints one summary line
/// (`holding OPEN refused REFUSED timedout TIMEDOUT failed FAILED`), holds them for `duration`,
/// then prints how many the server had closed (`closed-by-peer N of OPEN`).
pub fn hold(args: &HoldArgs) -> Result<(), AgnhostError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let targets: Vec<SocketAddr> = args
        .targets
        .iter()
        .map(|t| resolve(t))
        .collect::<Result<_, _>>()?;
    let want = (args.count + 1024) as nix::sys::resource::rlim_t;
    // A failure only leaves the old limit.
    if let Err(e) =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, want)
    {
        eprintln!("warning: cannot raise RLIMIT_NOFILE to {want}: {e}");
    }
    // Workers stop after `count` attempts, when this process runs out of descriptors, or
    // after 1,000 timed-out connects (the server is saturated: more would only take time).
    let next = AtomicUsize::new(0);
    let (refused, timed_out, failed) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let held: Vec<TcpStream> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..args.threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= args.count || stop.load(Ordering::Relaxed) {
                            break mine;
                        }
                        let addr = targets[i % targets.len()];
                        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                            Ok(mut c) => {
                                let _ = c.write_all(
                                    b"GET /healthz HTTP/1.1\r\nHost: agent\r\nX-Slow: 1\r\n",
                                );
                                mine.push(c);
                            }
                            Err(e) => {
                                let counter = match io_outcome(&e) {
                                    Outcome::Refused => &refused,
                                    Outcome::TimedOut => &timed_out,
                                    _ => &failed,
                                };
                                let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                                if e.raw_os_error() == Some(libc::EMFILE)
                                    || (std::ptr::eq(counter, &timed_out) && n >= 1_000)
                                {
                                    stop.store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    println!(
        "holding {} refused {} timedout {} failed {}",
        held.len(),
        refused.into_inner(),
        timed_out.into_inner(),
        failed.into_inner()
    );
    let _ = std::io::stdout().flush();
    std::thread::sleep(args.duration);
    // A connection the server closed reads EOF (or an error) at once.
    let mut closed = 0;
    let mut buf = [0u8; 4096];
    for mut c in held.iter() {
        let _ = c.set_nonblocking(true);
        loop {
            match c.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    println!("closed-by-peer {closed} of {}", held.len());
    Ok(())
}

fn resolve(target: &str) -> Result<SocketAddr, AgnhostError> {
    target
        .to_socket_addrs()
        .map_err(|e| AgnhostError::Resolve {
            target: target.into(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| AgnhostError::Resolve {
            target: target.into(),
            reason: "no address".into(),
        })
}

fn nonce() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub fn connect(args: &ConnectArgs) -> Result<Outcome, AgnhostError> {
    let addr = resolve(&args.target)?;
    let message = args.message.replace(['\n', '\r'], " ");
    Ok(match args.protocol {
        Protocol::Tcp => connect_tcp(addr, args.timeout, &message),
        Protocol::Udp => connect_udp(addr, args.timeout, &message),
    })
}

fn io_outcome(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        TimedOut | WouldBlock => Outcome::TimedOut,
        ConnectionRefused | ConnectionReset | HostUnreachable | NetworkUnreachable => {
            Outcome::Refused
        }
        _ => Outcome::Failed(e.to_string()),
    }
}

fn connect_tcp(addr: SocketAddr, timeout: Duration, message: &str) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return io_outcome(&e),
    };
    let nonce = nonce();
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let _ = stream.set_read_timeout(Some(left));
    if let Err(e) = stream.write_all(format!("{MAGIC} {nonce} {message}\n").as_bytes()) {
        return io_outcome(&e);
    }
    let mut reader = BufReader::new(stream.take(MAX_MESSAGE as u64));
    let mut line = Vec::new();
    match reader.read_until(b'\n', &mut line) {
        Ok(0) => Outcome::Failed("connection closed without an answer".into()),
        Ok(_) => match parse_answer(&line, &nonce) {
            Some(by) => Outcome::Answered { by },
            None => Outcome::Failed("unexpected answer".into()),
        },
        Err(e) => io_outcome(&e),
    }
}

fn connect_udp(addr: SocketAddr, timeout: Duration, message: &str) -> Outcome {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal socket address");
    let socket = match UdpSocket::bind(bind).and_then(|s| s.connect(addr).map(|_| s)) {
        Ok(s) => s,
        Err(e) => return io_outcome(&e),
    };
    let nonce = nonce();
    let request = format!("{MAGIC} {nonce} {message}\n");
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_MESSAGE];
    // UDP may lose a datagram on a healthy path too: resend every 200 ms until the deadline.
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Outcome::TimedOut;
        }
        if let Err(e) = socket.send(request.as_bytes()) {
            return io_outcome(&e);
        }
        let slice = (deadline - now).min(Duration::from_millis(200));
        let _ = socket.set_read_timeout(Some(slice.max(Duration::from_millis(1))));
        let until = Instant::now() + slice;
        while Instant::now() < until {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    if let Some(by) = parse_answer(&buf[..n], &nonce) {
                        return Outcome::Answered { by };
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                // The kernel reports ICMP port unreachable on the next call of a connected socket.
                Err(e) => return io_outcome(&e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_probes_and_echoes_the_nonce() {
        let reply = answer(b"veilnet-agnhost abc hello world\n", "pod-a").unwrap();
        assert_eq!(reply, b"veilnet-agnhost abc pod-a\n");
        assert_eq!(parse_answer(&reply, "abc"), Some("pod-a".into()));
        assert_eq!(parse_answer(&reply, "other"), None);
        assert!(answer(b"GET / HTTP/1.1\r\n", "x").is_none());
        assert!(answer(&[0xff, 0xfe], "x").is_none());
    }

    #[test]
    fn exit_codes_are_distinct() {
        let codes: Vec<i32> = [
            Outcome::Answered { by: "x".into() },
            Outcome::TimedOut,
            Outcome::Refused,
            Outcome::Failed("e".into()),
        ]
        .iter()
        .map(Outcome::exit_code)
        .collect();
        assert_eq!(codes, vec![0, 1, 2, 3]);
    }
}
