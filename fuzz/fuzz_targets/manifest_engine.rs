//! Manifest text → loader → policy engine. Never panics, and the compiled state, looked up the way the
//! kernel does, agrees with the reference evaluator on every pod-to-pod packet of the cluster.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use ztrust_agent::datapath::keys::lookup;
use ztrust_agent::policy::{Engine, reference::reference_allowed};
use ztrust_agent::source::dir::parse_str;
use ztrust_common::{dir, proto};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let loaded = parse_str("fuzz.yaml", &text);
    let cluster = loaded.cluster;
    let desired = Engine::new().compile(&cluster);
    // Bounded: a handful of pods and ports.
    let pods: Vec<_> = cluster.pods.values().filter(|p| !p.host_network && !p.ips.is_empty()).take(4).collect();
    // Two pods claiming one address make "the pod at this address" ambiguous: not a verdict to compare.
    let mut ips: Vec<IpAddr> = cluster.pods.values().flat_map(|p| p.ips.iter().copied()).collect();
    let count = ips.len();
    ips.sort();
    ips.dedup();
    if ips.len() != count {
        return;
    }
    for src in &pods {
        for dst in &pods {
            for &(protocol, port) in &[(proto::TCP, 80u16), (proto::UDP, 53), (proto::SCTP, 9000), (proto::TCP, 8443)] {
                let (s, d): (IpAddr, IpAddr) = (src.ips[0], dst.ips[0]);
                if s.is_ipv4() != d.is_ipv4() || s == d {
                    continue;
                }
                let compiled = lookup(&desired, s, d, protocol, port, &src.object_ref(), dir::EGRESS)
                    && lookup(&desired, s, d, protocol, port, &dst.object_ref(), dir::INGRESS);
                let reference = reference_allowed(&cluster, s, d, protocol, port);
                assert_eq!(compiled, reference, "{s} -> {d} proto {protocol} port {port}");
            }
        }
    }
});
