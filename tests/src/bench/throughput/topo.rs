//! The benchmark's node: two pods (client, server) routed by a node namespace, wired by the lab's
//! `ztrust_lab::node`; their servers (iperf3, the RR and CRR echo servers) and clients.

use super::*;

use std::net::{IpAddr, Ipv4Addr};

use ztrust_lab::node::NodeAddrs;

/// The host-side interfaces of the client and the server.
pub(super) const CLIENT_IF: &str = "ztbhc";
pub(super) const SERVER_IF: &str = "ztbhs";

pub(super) struct Topo {
    pub(super) node: String,
    pub(super) client: String,
    pub(super) server: String,
    pub(super) pin: PathBuf,
    /// The `hook` variant's pins (its own copy of the object's maps, unused).
    pub(super) pass_pin: PathBuf,
    pub(super) iperf: Option<Child>,
    /// The CPU both ends of each test run on.
    pub(super) cpu: Option<usize>,
}

impl Topo {
    pub(super) fn new(cpu: Option<usize>) -> Self {
        let id = std::process::id();
        let t = Topo {
            node: format!("ztbt{id}n"),
            client: format!("ztbt{id}c"),
            server: format!("ztbt{id}s"),
            pin: PathBuf::from(format!("/sys/fs/bpf/ztbt{id}")),
            pass_pin: PathBuf::from(format!("/sys/fs/bpf/ztbt{id}p")),
            iperf: None,
            cpu,
        };
        // The lab's node wiring (`ztrust_lab::node`), as the privileged tests and the lab have it.
        let node = NodeAddrs {
            v4: Ipv4Addr::new(10, 251, 0, 1),
            v6: "fd00:10:251::1".parse().expect("an IPv6 address"),
        };
        ztrust_lab::node::make_node(&t.node, node).expect("the node's namespace");
        for (pod, host_if, addr) in [
            (&t.client, CLIENT_IF, CLIENT_IP),
            (&t.server, SERVER_IF, SERVER_IP),
        ] {
            let ips = [IpAddr::from(addr)];
            ztrust_lab::node::make_endpoint(&t.node, pod, host_if, &ips).expect("a pod's namespace");
            ztrust_lab::node::link_up(&t.node, host_if, &ips, node).expect("a pod's link");
        }
        t
    }

    pub(super) fn exec(&self, netns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns]).args(args);
        c
    }

    /// iperf3's arguments that pin it to the test CPU.
    pub(super) fn iperf_affinity(&self) -> Vec<String> {
        self.cpu
            .map(|cpu| vec!["-A".to_owned(), cpu.to_string()])
            .unwrap_or_default()
    }

    pub(super) fn start_servers(&mut self) {
        let (addr, port) = (ip(SERVER_IP), IPERF_PORT.to_string());
        let mut args = vec!["iperf3", "-s", "-B", &addr, "-p", &port];
        let affinity = self.iperf_affinity();
        args.extend(affinity.iter().map(String::as_str));
        let child = crate::bench::kill_with_parent(&mut self.exec(&self.server, &args))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s");
        self.iperf = Some(child);
        let (netns, cpu) = (self.server.clone(), self.cpu);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            enter_netns(&netns);
            // The connection threads below inherit it.
            pin_to(cpu);
            let rr = TcpListener::bind(SocketAddr::from((SERVER_IP, RR_PORT))).expect("bind rr");
            let crr = TcpListener::bind(SocketAddr::from((SERVER_IP, CRR_PORT))).expect("bind crr");
            tx.send(()).unwrap();
            // CRR: one transaction per connection, served on the accepting thread (no thread spawn per
            // connection in the measured path).
            std::thread::spawn(move || {
                let mut buf = [0u8; MSG];
                for c in crr.incoming() {
                    let Ok(mut c) = c else { continue };
                    let _ = c.set_nodelay(true);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                    if c.read_exact(&mut buf).is_ok() {
                        let _ = c.write_all(&buf);
                        // Until the client closes (it resets: no TIME_WAIT on either side).
                        let _ = c.read(&mut buf);
                    }
                }
            });
            // RR: long connections, a thread each. (Blocking accept: the thread ends with the process.)
            for c in rr.incoming() {
                let Ok(mut c) = c else { continue };
                let _ = c.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buf = [0u8; MSG];
                    while c.read_exact(&mut buf).is_ok() {
                        if c.write_all(&buf).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("rr server up");
        // iperf3 listening.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.in_client(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from((SERVER_IP, IPERF_PORT)),
                Duration::from_millis(200),
            )
            .is_ok()
        }) {
            assert!(Instant::now() < deadline, "iperf3 server not reachable");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(super) fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (netns, cpu) = (self.client.clone(), self.cpu);
        std::thread::spawn(move || {
            enter_netns(&netns);
            pin_to(cpu);
            f()
        })
        .join()
        .expect("client thread")
    }

    /// iperf3 from the client: (Mbit/s received, loss percent for UDP).
    pub(super) fn iperf(&self, dst: [u8; 4], udp: Option<&str>, seconds: u32) -> (f64, Option<f64>) {
        let s = seconds.to_string();
        let server = ip(dst);
        let mut args = vec!["iperf3", "-c", &server, "-p", "5201", "-t", &s, "-J"];
        let affinity = self.iperf_affinity();
        args.extend(affinity.iter().map(String::as_str));
        if let Some(rate) = udp {
            args.extend(["-u", "-b", rate, "-l", "1400"]);
        }
        let out = self.exec(&self.client, &args).output().expect("iperf3 -c");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let end = &v["end"];
        if udp.is_some() {
            let sum = if end["sum_received"].is_object() {
                &end["sum_received"]
            } else {
                &end["sum"]
            };
            let bps = sum["bits_per_second"].as_f64().unwrap_or(0.0);
            let loss = end["sum"]["lost_percent"].as_f64();
            (bps / 1e6, loss)
        } else {
            (
                end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
                None,
            )
        }
    }

    /// Transactions per second: one connection (`new_conn` false) or one per transaction.
    pub(super) fn rr(&self, dst: [u8; 4], new_conn: bool, seconds: u32) -> f64 {
        self.in_client(move || {
            let dst = SocketAddr::from((dst, if new_conn { CRR_PORT } else { RR_PORT }));
            let buf = [7u8; MSG];
            let mut back = [0u8; MSG];
            let end = Instant::now() + Duration::from_secs(u64::from(seconds));
            let start = Instant::now();
            let mut n = 0u64;
            let mut conn: Option<TcpStream> = None;
            while Instant::now() < end {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => {
                        let Ok(c) = TcpStream::connect_timeout(&dst, Duration::from_millis(500)) else {
                            continue;
                        };
                        let _ = c.set_nodelay(true);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                        conn.insert(c)
                    }
                };
                if c.write_all(&buf).is_err() || c.read_exact(&mut back).is_err() {
                    conn = None;
                    continue;
                }
                n += 1;
                if new_conn {
                    // Close with RST (SO_LINGER 0): no TIME_WAIT, so ports never run out.
                    let c = conn.take().unwrap();
                    let _ = set_linger_zero(&c);
                }
            }
            n as f64 / start.elapsed().as_secs_f64()
        })
    }
}

/// `SO_LINGER` with a zero timeout: `close` resets the connection instead of leaving it in TIME_WAIT.
fn set_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    let off = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &off).map_err(std::io::Error::from)
}

impl Drop for Topo {
    fn drop(&mut self) {
        if let Some(mut c) = self.iperf.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = loader::cleanup(&self.pin);
        let _ = loader::cleanup(&self.pass_pin);
        for n in [&self.client, &self.server, &self.node] {
            sh_quiet(&["ip", "netns", "del", n]);
        }
    }
}
