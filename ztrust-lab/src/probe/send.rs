//! One probe on the wire: a TCP connection or a UDP exchange from inside a pod's namespace, judged by
//! what the server answers.

use super::*;

pub(super) fn run_one(job: &Job, timeout: Duration) -> Probe {
    let start = Instant::now();
    let expected: Vec<String> = job
        .answers
        .iter()
        .map(|(key, _, port)| reply_line(key, *port, job.protocol))
        .collect();
    let addr = SocketAddr::new(job.to_ip, job.port);
    let (result, detail, answered) = match job.protocol {
        Protocol::Sctp => (
            Verdict::Unsupported,
            "no SCTP sockets in this kernel".to_owned(),
            None,
        ),
        Protocol::Tcp => tcp(addr, timeout, &expected),
        Protocol::Udp => udp(addr, timeout, &expected),
    };
    // Who it reached: the one that answered, else the only one it could reach.
    let (to, to_ip, port) = match (answered, job.answers.as_slice()) {
        (Some(i), _) => job.answers[i].clone(),
        (None, [only]) => only.clone(),
        (None, _) => (
            format!("service:{}", job.via.as_ref().map_or("", |v| v.service.as_str())),
            job.to_ip,
            job.port,
        ),
    };
    Probe {
        from: job.from.clone(),
        to,
        to_ip,
        port,
        protocol: job.protocol,
        result,
        detail,
        latency_ms: (start.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0,
        via: job.via.clone(),
    }
}

pub(super) fn error_detail(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout".into(),
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "reset".into(),
        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => "unreachable".into(),
        _ => e.to_string(),
    }
}

/// Allowed when `got` is one of the `expected` replies (which one: the index).
pub(super) fn judge(got: &[u8], expected: &[String]) -> (Verdict, String, Option<usize>) {
    if let Some(i) = expected.iter().position(|e| got == e.as_bytes()) {
        (Verdict::Allowed, "ok".into(), Some(i))
    } else if got.is_empty() {
        // Connected, then closed without a word: not the lab's server.
        (Verdict::Denied, "closed without reply".into(), None)
    } else {
        (
            Verdict::Denied,
            format!("unexpected reply {:?}", String::from_utf8_lossy(got).trim_end()),
            None,
        )
    }
}

pub(super) fn tcp(
    addr: SocketAddr,
    timeout: Duration,
    expected: &[String],
) -> (Verdict, String, Option<usize>) {
    let deadline = Instant::now() + timeout;
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return (Verdict::Denied, error_detail(&e), None),
    };
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(50));
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.ends_with(b"\n") || got.len() > 1024 {
                    break;
                }
            }
            // Connected but the reply never came: the return path is what is blocked.
            Err(e) => {
                return (
                    Verdict::Denied,
                    format!("connected, then {}", error_detail(&e)),
                    None,
                );
            }
        }
    }
    judge(&got, expected)
}

pub(super) fn udp(
    addr: SocketAddr,
    timeout: Duration,
    expected: &[String],
) -> (Verdict, String, Option<usize>) {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let socket = match UdpSocket::bind(local).and_then(|s| s.connect(addr).map(|()| s)) {
        Ok(s) => s,
        Err(e) => return (Verdict::Denied, error_detail(&e), None),
    };
    let _ = socket.set_read_timeout(Some(timeout));
    let mut last = String::new();
    // A datagram may be lost on a first packet (neighbour resolution): one retry.
    for _attempt in 0..2 {
        if let Err(e) = socket.send(b"probe\n") {
            return (Verdict::Denied, error_detail(&e), None);
        }
        let mut buf = [0u8; 1024];
        match socket.recv(&mut buf) {
            Ok(n) => return judge(&buf[..n], expected),
            // ICMP port unreachable, reported on a connected socket.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                return (Verdict::Denied, "refused".into(), None);
            }
            Err(e) => last = error_detail(&e),
        }
    }
    (Verdict::Denied, last, None)
}
