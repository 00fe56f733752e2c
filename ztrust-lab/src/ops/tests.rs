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
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("tonode"), "{err}");
}
