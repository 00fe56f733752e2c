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
