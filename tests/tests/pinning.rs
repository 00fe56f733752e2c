//! The programs pass the verifier, maps and links are pinned, a second agent adopts them with their
//! content, and cleanup removes every pin.

mod common;

use ztrust_agent::datapath::loader::{self, Datapath};
use ztrust_common::EndpointInfo;

#[test]
fn load_pin_adopt_cleanup() {
    common::require_root();
    let topo = common::Topology::new("ztpin", 202, 1);
    common::enter_netns(&topo.node);
    let host_if = topo.pods[0].host_if.clone();
    let index = nix::net::if_::if_nametoindex(host_if.as_str()).unwrap();

    let mut first = Datapath::load(&topo.pin_dir).expect("programs load and pass the verifier");
    first.attach(&host_if, index).expect("attach");
    let info = EndpointInfo { endpoint_id: index, identity: 300, flags: 3, _pad: 0 };
    first.maps.endpoints.insert(index, info, 0).unwrap();
    for f in ["maps/ZT_ENDPOINTS", "maps/ZT_POLICY", "maps/ZT_IPCACHE", "maps/ZT_CONNTRACK"] {
        assert!(topo.pin_dir.join(f).exists(), "{f} pinned");
    }
    assert!(topo.pin_dir.join(format!("links/from-pod/{host_if}")).exists());
    assert!(topo.pin_dir.join(format!("links/to-pod/{host_if}")).exists());
    drop(first);

    // The agent is gone; the pinned state is still there and a new agent sees it.
    let mut second = Datapath::load(&topo.pin_dir).expect("reload");
    assert_eq!(second.maps.endpoints.get(&index, 0).unwrap(), info, "map content survives the agent");
    assert_eq!(second.pinned_interfaces(), vec![host_if.clone()]);
    second.attach(&host_if, index).expect("adopt pinned links");
    drop(second);

    loader::cleanup(&topo.pin_dir).unwrap();
    assert!(!topo.pin_dir.exists());
}

/// Kernels before 6.6 have no TCX: the programs go on a clsact qdisc as BPF filters instead. Forced here,
/// they filter real traffic (fail closed before the endpoint is known) and detach with the agent.
#[test]
fn clsact_fallback_filters_and_detaches() {
    common::require_root();
    let mut topo = common::Topology::new("ztcls", 208, 2);
    topo.serve(1, 80);
    common::enter_netns(&topo.node);
    assert!(topo.tcp(0, 1, 80), "no program yet: traffic flows");
    let mut dp = Datapath::load(&topo.pin_dir).expect("load");
    dp.attach_mode = ztrust_agent::datapath::loader::AttachMode::Clsact;
    for p in &topo.pods {
        let index = nix::net::if_::if_nametoindex(p.host_if.as_str()).unwrap();
        dp.attach(&p.host_if, index).expect("clsact attach");
    }
    let filters = std::process::Command::new("tc")
        .args(["filter", "show", "dev", &topo.pods[0].host_if, "ingress"])
        .output()
        .unwrap();
    let filters = String::from_utf8_lossy(&filters.stdout);
    assert!(filters.contains("bpf") && filters.contains("zt_from_pod"), "a BPF filter on the clsact qdisc: {filters}");
    assert!(!topo.tcp(0, 1, 80), "the filter drops traffic of unknown endpoints");
    assert!(!topo.pin_dir.join(format!("links/from-pod/{}", topo.pods[0].host_if)).exists(), "nothing pinned");
    drop(dp);
    assert!(topo.tcp(0, 1, 80), "the filters went with the agent");
}
