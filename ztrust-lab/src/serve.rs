//! `ztrust-lab serve`: the server in every pod and external host. It answers on each port with one line naming
//! who answered, `<namespace>/<pod> <port>/<PROTO>\n`, so a probe knows it reached the right place.
//!
//! TCP: accept, write the line, then echo every line the client sends until it closes (a probe closes
//! at once; a long-lived client can check that its connection keeps working). UDP: answer every datagram with the line. Sockets are bound to
//! `[::]`, which on Linux (`net.ipv6.bindv6only=0`, the default in a new namespace) takes IPv4 too.

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;

use super::{Result, io_err};
use ztrust_agent::model::Protocol;

/// Arguments of `ztrust-lab serve`.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct ServeArgs {
    /// Who answers: `namespace/pod`, or `external/<name>`.
    #[arg(long)]
    pub name: String,
    /// TCP ports (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub tcp: Vec<u16>,
    /// UDP ports (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub udp: Vec<u16>,
    /// SCTP ports: this kernel may have no SCTP, so they are noted and skipped.
    #[arg(long, value_delimiter = ',')]
    pub sctp: Vec<u16>,
    /// Created once every socket is bound.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// The state directory of the lab this server belongs to (so `ztrust-lab down` can find it without state).
    #[arg(long)]
    pub lab: Option<PathBuf>,
}

impl ServeArgs {
    /// The command line after the binary (`ztrust-lab`): `serve --name … [--tcp …] [--udp …] … --lab
    /// <dir>`. `serve --name` comes first and `--lab` last, which is how `down` recognises its servers.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["serve".to_owned(), "--name".into(), self.name.clone()];
        let list = |ports: &[u16]| ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        for (flag, ports) in [("--tcp", &self.tcp), ("--udp", &self.udp), ("--sctp", &self.sctp)] {
            if !ports.is_empty() {
                a.push(flag.into());
                a.push(list(ports));
            }
        }
        if let Some(f) = &self.ready_file {
            a.push("--ready-file".into());
            a.push(f.display().to_string());
        }
        if let Some(l) = &self.lab {
            a.push("--lab".into());
            a.push(l.display().to_string());
        }
        a
    }
}

/// The line a server answers with.
pub fn reply_line(name: &str, port: u16, protocol: Protocol) -> String {
    format!("{name} {port}/{protocol}\n")
}

fn any(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
    ]
}

/// Binds every port, reports readiness, and serves until killed.
/// Echoes lines back until the client closes or goes quiet for a minute.
fn echo(stream: std::net::TcpStream) {
    use std::io::BufRead as _;
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(60)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in std::io::BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{line}").is_err() {
            return;
        }
    }
}

pub fn serve_main(args: ServeArgs) -> Result<()> {
    let mut threads = Vec::new();
    for port in &args.sctp {
        eprintln!(
            "{}: SCTP port {port} skipped: this kernel has no SCTP sockets",
            args.name
        );
    }
    for port in args.tcp.iter().copied() {
        // `[::]` first (both families); `0.0.0.0` where IPv6 is off.
        let listener =
            TcpListener::bind(&any(port)[..]).map_err(io_err(format!("binding TCP port {port}")))?;
        let line = reply_line(&args.name, port, Protocol::Tcp);
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(mut s) => {
                        // The client may be gone already (a probe that timed out): nothing to do then.
                        if s.write_all(line.as_bytes()).is_err() {
                            continue;
                        }
                        std::thread::spawn(move || echo(s));
                    }
                    Err(e) => eprintln!("accept on TCP port {port}: {e}"),
                }
            }
        }));
    }
    for port in args.udp.iter().copied() {
        let socket = UdpSocket::bind(&any(port)[..]).map_err(io_err(format!("binding UDP port {port}")))?;
        let line = reply_line(&args.name, port, Protocol::Udp);
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        let _ = socket.send_to(line.as_bytes(), peer);
                    }
                    Err(e) => eprintln!("receive on UDP port {port}: {e}"),
                }
            }
        }));
    }
    if let Some(ready) = &args.ready_file {
        std::fs::write(ready, b"ready\n").map_err(io_err(format!("writing {}", ready.display())))?;
    }
    eprintln!("{}: serving TCP {:?} UDP {:?}", args.name, args.tcp, args.udp);
    if threads.is_empty() {
        // Nothing to serve; stay alive so the lab's bookkeeping is uniform.
        loop {
            std::thread::park();
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn args_round_trip_through_the_command_line() {
        let args = ServeArgs {
            name: "payments/frontend".into(),
            tcp: vec![80, 81],
            udp: vec![53],
            sctp: vec![],
            ready_file: Some("/tmp/r".into()),
            lab: Some("/run/ztrust/lab".into()),
        };
        let argv = args.to_args();
        assert_eq!(argv[..2], ["serve", "--name"]);
        assert_eq!(argv[argv.len() - 2..], ["--lab", "/run/ztrust/lab"]);
        let parsed = Cli::parse_from(std::iter::once("x".to_owned()).chain(argv.into_iter().skip(1))).serve;
        assert_eq!(parsed, args);
    }

    #[test]
    fn line() {
        assert_eq!(reply_line("a/b", 53, Protocol::Udp), "a/b 53/UDP\n");
    }

    #[test]
    fn serves_tcp_and_udp_on_loopback() {
        // Free ports picked by the kernel, then released for the server to take.
        let tcp = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let udp = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let args = ServeArgs {
            name: "t/p".into(),
            tcp: vec![tcp],
            udp: vec![udp],
            ready_file: Some(ready.clone()),
            ..Default::default()
        };
        std::thread::spawn(move || serve_main(args));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !ready.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let s = std::net::TcpStream::connect(("127.0.0.1", tcp)).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut got = String::new();
        std::io::BufRead::read_line(&mut r, &mut got).unwrap();
        assert_eq!(got, format!("t/p {tcp}/TCP\n"));
        // Then it echoes lines, for clients that keep a connection open.
        writeln!(w, "still there?").unwrap();
        got.clear();
        std::io::BufRead::read_line(&mut r, &mut got).unwrap();
        assert_eq!(got, "still there?\n");
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        u.send_to(b"x", ("127.0.0.1", udp)).unwrap();
        let mut buf = [0u8; 64];
        let n = u.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("t/p {udp}/UDP\n").as_bytes());
    }
}
