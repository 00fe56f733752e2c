use super::*;

#[test]
fn label_changes_parse_like_kubectl() {
    assert_eq!(
        "app=web".parse::<LabelChange>().unwrap(),
        LabelChange {
            key: "app".into(),
            value: Some("web".into())
        }
    );
    assert_eq!(
        "app=".parse::<LabelChange>().unwrap(),
        LabelChange {
            key: "app".into(),
            value: Some(String::new())
        }
    );
    assert_eq!(
        "app-".parse::<LabelChange>().unwrap(),
        LabelChange {
            key: "app".into(),
            value: None
        }
    );
    assert!("app".parse::<LabelChange>().is_err());
    assert!("=x".parse::<LabelChange>().is_err());
    assert!("-".parse::<LabelChange>().is_err());
}

#[test]
fn serve_args_split_protocols() {
    let state = LabState {
        state_dir: "/run/x".into(),
        ..Default::default()
    };
    let ports = vec![
        ContainerPort {
            name: None,
            port: 53,
            protocol: Protocol::Udp,
        },
        ContainerPort {
            name: None,
            port: 53,
            protocol: Protocol::Tcp,
        },
        ContainerPort {
            name: None,
            port: 9,
            protocol: Protocol::Sctp,
        },
    ];
    let a = serve_args(&state, "kube-system/coredns", &ports, 3);
    assert_eq!((a.tcp, a.udp, a.sctp), (vec![53], vec![53], vec![9]));
    assert_eq!(a.ready_file.unwrap(), Path::new("/run/x/ready/3"));
    assert_eq!(a.lab.unwrap(), Path::new("/run/x"));
}

#[test]
fn nodes_are_named_as_kind_names_them_and_their_files_are_found() {
    assert_eq!(node_name("ztlab", 0), "ztlab-node");
    assert_eq!(node_name("ztlab", 1), "ztlab-node2");
    assert_eq!(node_name("ztlab", 15), "ztlab-node16");
    for (netns, is) in [
        ("ztlab-node", true),
        ("ztlab-node2", true),
        ("ztlab-node12", true),
        ("ztlab-p3", false),
        ("ztlab-nodes", false),
        ("other-node", false),
    ] {
        assert_eq!(is_node_netns("ztlab", netns), is, "{netns}");
    }
    for (file, is) in [
        ("agent.sock", true),
        ("agent-node3.sock", true),
        ("flows.jsonl", true),
        ("flows-node2.jsonl", true),
        ("flows-nodeX.jsonl", false),
        ("agent.log", false),
        ("state.json", false),
        ("notes.txt", false),
    ] {
        assert_eq!(is_agent_file(file), is, "{file}");
    }
}

#[test]
fn up_refuses_a_number_of_nodes_it_cannot_make() {
    for nodes in [0, MAX_NODES + 1] {
        let err = up(
            Path::new("/nonexistent"),
            UpOptions {
                nodes,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("number of nodes"), "{err}");
    }
    let err = up(
        Path::new("/nonexistent"),
        UpOptions {
            if_prefix: "tonode".into(),
            nodes: 2,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("tonode"), "{err}");
}

#[test]
fn a_state_of_before_nodes_is_read_as_one_node() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("state.json"),
        r#"{"state_dir": "/run/ztrust/lab", "prefix": "old", "if_prefix": "ztl", "ext_if_prefix": "ztx",
            "lab_bin": "/bin/ztrust-lab", "node_netns": "old-node", "node_ips": ["10.244.0.1"],
            "pods": [{"namespace": "a", "name": "p", "labels": {}, "ips": ["10.244.0.10"], "ports": [],
                      "host_network": false, "netns": "old-p1", "host_if": "ztl1", "index": 1,
                      "server_pid": null}],
            "externals": [], "next_index": 2,
            "agent": {"pid": 1, "pin_dir": "/sys/fs/bpf/custom", "socket": "/s", "flow_log": "/f", "log": "/l"}}"#,
    )
    .unwrap();
    let s = LabState::load(dir.path()).unwrap().unwrap();
    assert_eq!(s.nodes.len(), 1);
    assert_eq!(s.first_node().name, "old-node");
    assert_eq!(
        s.first_node().agent.as_ref().unwrap().pin_dir,
        Path::new("/sys/fs/bpf/custom")
    );
    assert_eq!(s.pods[0].node, "old-node");
    // Written again, it is a state of nodes.
    let text = serde_json::to_string(&s).unwrap();
    assert!(
        text.contains("\"nodes\"") && !text.contains("node_netns"),
        "{text}"
    );
}
