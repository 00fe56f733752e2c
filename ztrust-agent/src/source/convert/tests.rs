use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::*;
use crate::datapath::keys::lookup;
use crate::model::ObjectRef;
use crate::model::{Peer, PortRef, Protocol};
use crate::policy::Engine;
use crate::source::LoadError;
use crate::source::dir::parse_str;

fn policy(yaml: &str) -> (Option<model::NetworkPolicy>, Vec<LoadError>) {
    let l = parse_str("np.yaml", yaml);
    (l.cluster.policies.values().next().cloned(), l.errors)
}

fn np(spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np, namespace: prod}}\nspec:\n{spec}"
    )
}

#[test]
fn pod_validation_drops_only_the_bad_values() {
    let l = parse_str(
        "pod.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: a}
spec:
  containers:
  - ports: [{containerPort: 0}, {containerPort: 80, name: HTTP}, {containerPort: 81, protocol: ICMP}, {containerPort: 82, name: web}]
status: {podIPs: [{ip: 10.0.0.300}, {ip: 10.0.0.3}]}
"#,
    );
    let pod = &l.cluster.pods[&ObjectRef::new("a", "web")];
    assert_eq!(pod.ips, vec!["10.0.0.3".parse::<IpAddr>().expect("ip")]);
    assert_eq!(pod.ports.len(), 1);
    let msgs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
    assert_eq!(msgs.len(), 4, "{msgs:#?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains("pod.yaml: Pod a/web: status.podIPs[0].ip: invalid IP address")),
        "{msgs:#?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("spec.containers[0].ports[0].containerPort")),
        "{msgs:#?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("spec.containers[0].ports[1].name")),
        "{msgs:#?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("spec.containers[0].ports[2].protocol")),
        "{msgs:#?}"
    );
}

#[test]
fn policy_types_are_defaulted_as_the_api_server_does() {
    let (p, e) = policy(&np("  podSelector: {}\n"));
    let p = p.expect("policy");
    assert!(e.is_empty());
    assert_eq!(p.namespace, "prod");
    assert!(p.isolates_ingress && !p.isolates_egress, "Ingress always");
    let (p, _) = policy(&np("  podSelector: {}\n  egress: [{}]\n"));
    let p = p.expect("policy");
    assert!(
        p.isolates_ingress && p.isolates_egress,
        "an egress rule adds Egress"
    );
    let (p, _) = policy(&np("  podSelector: {}\n  egress: []\n"));
    assert!(
        !p.expect("policy").isolates_egress,
        "an empty egress list has no egress rule"
    );
    let (p, _) = policy(&np(
        "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n",
    ));
    let p = p.expect("policy");
    assert!(!p.isolates_ingress && p.isolates_egress);
    let (p, e) = policy(&np("  podSelector: {}\n  policyTypes: [Ingres]\n"));
    let p = p.expect("policy");
    assert!(
        p.isolates_ingress && p.isolates_egress,
        "unknown type: isolate both"
    );
    assert!(e[0].to_string().contains("spec.policyTypes[0]"));
}

#[test]
fn empty_versus_absent() {
    let (p, _) = policy(&np("  podSelector: {}\n  ingress: [{}]\n"));
    let p = p.expect("policy");
    assert_eq!(
        p.ingress,
        vec![model::Rule::default()],
        "an empty rule allows everything"
    );
    let (p, _) = policy(&np("  podSelector: {}\n  ingress: [{from: [], ports: []}]\n"));
    assert_eq!(
        p.expect("policy").ingress,
        vec![model::Rule::default()],
        "empty lists = absent lists"
    );
    let (p, _) = policy(&np("  podSelector: {}\n  ingress: []\n"));
    let p = p.expect("policy");
    assert!(p.ingress.is_empty() && p.isolates_ingress, "no rules: deny all");
}

#[test]
fn peers_and_ports() {
    let (p, e) = policy(&np(r#"
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
      namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [blue]}]}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    - ipBlock: {cidr: "fd00::/64"}
    ports:
    - {port: 5432}
    - {port: http, protocol: TCP}
    - {port: 32000, endPort: 32768, protocol: UDP}
    - {protocol: SCTP}
"#));
    assert!(e.is_empty(), "{e:?}");
    let r = &p.expect("policy").ingress[0];
    assert!(
        matches!(&r.peers[0], Peer::Pods { namespace_selector: Some(n), pod_selector: Some(_) } if n.match_expressions.len() == 1)
    );
    assert!(matches!(&r.peers[1], Peer::IpBlock { except, .. } if except.len() == 1));
    assert_eq!(r.ports[0].port, Some(PortRef::Number(5432)));
    assert_eq!(r.ports[0].protocol, Protocol::Tcp, "protocol defaults to TCP");
    assert_eq!(r.ports[1].port, Some(PortRef::Name("http".into())));
    assert_eq!(
        (r.ports[2].protocol, r.ports[2].end_port),
        (Protocol::Udp, Some(32768))
    );
    assert_eq!((r.ports[3].protocol, &r.ports[3].port), (Protocol::Sctp, &None));
}

/// Every validation error names the file, the object and the field.
#[test]
fn errors_name_file_object_and_field() {
    let cases = [
        (
            "  ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 10.0.0.1}}]}]",
            "spec.ingress[0].from[1].ipBlock.cidr",
        ),
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/25]}}]}]",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [\"fd00::/120\"]}}]}]",
            "spec.ingress[0].from[0].ipBlock.except[0]",
        ),
        (
            "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}, podSelector: {}}]}]",
            "spec.egress[0].to[0]",
        ),
        ("  egress: [{to: [{}]}]", "spec.egress[0].to[0]"),
        (
            "  ingress: [{ports: [{port: 0}]}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "  ingress: [{ports: [{port: 70000}]}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "  ingress: [{ports: [{port: \"80\"}]}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "  ingress: [{ports: [{port: Http}]}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "  ingress: [{ports: [{port: a-very-long-port-name}]}]",
            "spec.ingress[0].ports[0].port",
        ),
        (
            "  ingress: [{ports: [{port: http, endPort: 90}]}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "  ingress: [{ports: [{endPort: 90}]}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "  ingress: [{ports: [{port: 100, endPort: 90}]}]",
            "spec.ingress[0].ports[0].endPort",
        ),
        (
            "  ingress: [{ports: [{port: 100, protocol: ICMP}]}]",
            "spec.ingress[0].ports[0].protocol",
        ),
        (
            "  ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]}]",
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
        ),
        (
            "  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}}]}]",
            "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        ),
        (
            "  ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: Equals, values: [x]}]}}]}]",
            "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator",
        ),
    ];
    for (spec, field) in cases {
        let (p, e) = policy(&np(&format!("  podSelector: {{}}\n{spec}\n")));
        assert!(p.is_some(), "{spec}: the policy is kept");
        assert!(!e.is_empty(), "{spec}: an error");
        let msg = e[0].to_string();
        assert!(
            msg.starts_with(&format!("np.yaml: NetworkPolicy prod/np: {field}: ")),
            "{spec}: {msg}"
        );
    }
}

#[test]
fn invalid_peer_or_port_fails_closed() {
    // Only invalid peers: the rule goes (it must not become "from everyone").
    let (p, e) = policy(&np(
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: bogus}}]}]\n",
    ));
    let p = p.expect("policy");
    assert_eq!(
        p.ingress,
        vec![matches_nothing()],
        "the rule is kept (indices), matching nothing"
    );
    assert!(p.isolates_ingress);
    assert!(e[0].to_string().contains("fail closed"), "{}", e[0]);
    // A valid and an invalid peer: the valid one stays.
    let (p, _) = policy(&np(
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: bogus}}, {podSelector: {}}]}]\n",
    ));
    assert_eq!(p.expect("policy").ingress[0].peers.len(), 1);
    // Only invalid ports: the rule goes (it must not become "all ports").
    let (p, _) = policy(&np(
        "  podSelector: {}\n  ingress: [{ports: [{port: 0}]}, {ports: [{port: 80}]}]\n",
    ));
    let p = p.expect("policy");
    assert_eq!(p.ingress[0], matches_nothing());
    assert_eq!(p.ingress[1].ports.len(), 1, "the next rule keeps its index");
    // An invalid except drops its peer: leaving the except out would allow what it excludes.
    let (p, _) = policy(&np(
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.1.0/24]}}]}]\n",
    ));
    assert_eq!(p.expect("policy").ingress, vec![matches_nothing()]);
    // An except equal to the cidr is not a strict subset.
    let (p, e) = policy(&np(
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.0/24]}}]}]\n",
    ));
    assert_eq!(p.expect("policy").ingress, vec![matches_nothing()]);
    assert!(e[0].to_string().contains("strict subset"), "{}", e[0]);
    // An invalid podSelector drops the policy.
    let (p, e) = policy(&np(
        "  podSelector: {matchExpressions: [{key: a, operator: In}]}\n",
    ));
    assert!(p.is_none());
    assert!(e.iter().any(|e| {
        e.to_string()
            .contains("spec.podSelector.matchExpressions[0].values")
    }));
}

#[test]
fn undecodable_policy_still_isolates() {
    let (p, e) = policy(&np(
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: [1]}]}]\n",
    ));
    let p = p.expect("fail-closed policy");
    assert!(p.isolates_ingress && p.isolates_egress && p.ingress.is_empty() && p.egress.is_empty());
    assert!(e[0].to_string().contains("allows nothing"), "{}", e[0]);
}

/// From files to verdicts: the invalid peer denies instead of allowing everyone.
#[test]
fn loaded_policy_enforces_fail_closed() {
    let text = format!(
        "{}\n---\n{}\n---\n{}",
        np("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.2}}]}]\n"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: prod}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.1}",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: prod}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.2}",
    );
    let l = parse_str("x.yaml", &text);
    let d = Engine::new().compile(&l.cluster);
    let a: IpAddr = "10.0.0.1".parse().expect("ip");
    let b: IpAddr = "10.0.0.2".parse().expect("ip");
    assert!(!lookup(
        &d,
        b,
        a,
        ztrust_common::proto::TCP,
        80,
        &ObjectRef::new("prod", "a"),
        ztrust_common::dir::INGRESS
    ));
}

fn k8s_selector(s: &model::LabelSelector) -> LabelSelector {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    LabelSelector {
        match_labels: (!s.match_labels.is_empty()).then(|| s.match_labels.clone()),
        match_expressions: (!s.match_expressions.is_empty()).then(|| {
            s.match_expressions
                .iter()
                .map(|r| LabelSelectorRequirement {
                    key: r.key.clone(),
                    operator: format!("{:?}", r.operator),
                    values: (!r.values.is_empty()).then(|| r.values.iter().cloned().collect()),
                })
                .collect()
        }),
    }
}

/// The model policy written as the API object it came from (with explicit policyTypes).
fn to_k8s(p: &model::NetworkPolicy) -> NetworkPolicy {
    use k8s_openapi::api::networking::v1::{
        IPBlock, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicySpec,
    };
    let peer = |peer: &Peer| match peer {
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => NetworkPolicyPeer {
            namespace_selector: namespace_selector.as_ref().map(k8s_selector),
            pod_selector: pod_selector.as_ref().map(k8s_selector),
            ip_block: None,
        },
        Peer::IpBlock { cidr, except } => NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.to_string(),
                except: Some(except.iter().map(ToString::to_string).collect()),
            }),
            ..Default::default()
        },
    };
    let port = |p: &model::PortSpec| NetworkPolicyPort {
        protocol: Some(p.protocol.as_str().to_owned()),
        port: p.port.as_ref().map(|r| match r {
            PortRef::Number(n) => IntOrString::Int((*n).into()),
            PortRef::Name(s) => IntOrString::String(s.clone()),
        }),
        end_port: p.end_port.map(i32::from),
    };
    let mut types = Vec::new();
    if p.isolates_ingress {
        types.push("Ingress".to_owned());
    }
    if p.isolates_egress {
        types.push("Egress".to_owned());
    }
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            namespace: Some(p.namespace.clone()),
            annotations: p
                .audit
                .then(|| [("ztrust.io/mode".to_owned(), "audit".to_owned())].into()),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(k8s_selector(&p.pod_selector)),
            policy_types: Some(types),
            ingress: Some(
                p.ingress
                    .iter()
                    .map(|r| NetworkPolicyIngressRule {
                        from: Some(r.peers.iter().map(peer).collect()),
                        ports: Some(r.ports.iter().map(port).collect()),
                    })
                    .collect(),
            ),
            egress: Some(
                p.egress
                    .iter()
                    .map(|r| NetworkPolicyEgressRule {
                        to: Some(r.peers.iter().map(peer).collect()),
                        ports: Some(r.ports.iter().map(port).collect()),
                    })
                    .collect(),
            ),
        }),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

    /// A valid policy converts back to exactly itself (through JSON, as a file would be read); an
    /// invalid one converts with errors into a policy that isolates the same pods and in which
    /// every rule is either unchanged, stripped of invalid entries, or matches nothing.
    #[test]
    fn policy_conversion_round_trips(p in crate::policy::proptests::policy(0)) {
        proptest::prop_assume!(p.isolates_ingress || p.isolates_egress);
        let json = serde_json::to_value(to_k8s(&p)).expect("serializes");
        let back: NetworkPolicy = serde_json::from_value(json).expect("deserializes");
        let c = convert_policy(&back);
        let Some(got) = c.value else {
            // Only an invalid podSelector drops the policy.
            proptest::prop_assert!(c.errors.iter().any(|e| e.field.starts_with("spec.podSelector")));
            return Ok(());
        };
        if c.errors.is_empty() {
            proptest::prop_assert_eq!(got, p);
        } else {
            proptest::prop_assert_eq!((got.isolates_ingress, got.isolates_egress), (p.isolates_ingress, p.isolates_egress));
            for (mine, orig) in got.ingress.iter().chain(&got.egress).zip(p.ingress.iter().chain(&p.egress)) {
                let subset = mine.peers.iter().all(|x| orig.peers.contains(x))
                    && mine.ports.iter().all(|x| orig.ports.contains(x))
                    && (mine.peers.is_empty() == orig.peers.is_empty())
                    && (mine.ports.is_empty() == orig.ports.is_empty());
                proptest::prop_assert!(subset || *mine == matches_nothing(), "{:?} from {:?}", mine, orig);
            }
        }
    }
}

#[test]
fn the_mode_annotation_audits_a_policy_and_a_value_that_is_no_mode_enforces_it() {
    let with = |mode: &str| {
        np("  podSelector: {}\n  policyTypes: [Ingress]\n").replace(
            "{name: np, namespace: prod}",
            &format!("{{name: np, namespace: prod, annotations: {{ztrust.io/mode: {mode}}}}}"),
        )
    };
    for (mode, audit) in [("audit", true), ("Audit", true), ("enforce", false)] {
        let (p, errors) = policy(&with(mode));
        assert!(errors.is_empty(), "{mode}: {errors:?}");
        assert_eq!(p.unwrap().audit, audit, "{mode}");
    }
    let (p, errors) = policy(&with("audti"));
    assert!(!p.unwrap().audit, "a typo never stops enforcement");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].object, "NetworkPolicy prod/np");
    assert_eq!(errors[0].field, "metadata.annotations[ztrust.io/mode]");
    assert_eq!(errors[0].problem, Problem::Mode("audti".into()));
    let (p, _) = policy(&np("  podSelector: {}\n"));
    assert!(!p.unwrap().audit, "no annotation: enforced");
}
