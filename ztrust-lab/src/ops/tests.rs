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
