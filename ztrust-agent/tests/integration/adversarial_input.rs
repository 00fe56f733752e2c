//! Malformed, oversized and adversarial objects: each gets an error naming the object and the field,
//! nothing panics, and the valid policy beside them keeps enforcing.

use std::fmt::Write as _;
use std::net::IpAddr;

use ztrust_agent::datapath::keys::lookup;
use ztrust_agent::model::ObjectRef;
use ztrust_agent::policy::Engine;
use ztrust_agent::source::dir::parse_str;
use ztrust_common::{dir, proto};

const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 80, name: http}]}]}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {containers: [{name: c, image: i, ports: [{containerPort: 80, name: http}]}]}
status: {podIP: 10.244.0.11}
---
# The valid policy: b accepts a on 80.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: good, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}]}]
";

fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n{spec}\n"
    )
}

#[test]
fn bad_objects_are_named_and_the_rest_keeps_enforcing() {
    let mut text = CLUSTER.to_owned();
    // Invalid peers and ports, each in a policy of its own selecting pod a.
    let cases = [
        (
            "bad-cidr",
            "ipBlock.cidr",
            "  podSelector: {matchLabels: {app: a}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.300/8}}]}]",
        ),
        (
            "except-outside",
            "except",
            "  podSelector: {matchLabels: {app: a}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]",
        ),
        (
            "port-range",
            "port",
            "  podSelector: {matchLabels: {app: a}}\n  ingress: [{ports: [{port: 70000}]}]",
        ),
        (
            "bad-port-name",
            "port",
            "  podSelector: {matchLabels: {app: a}}\n  ingress: [{ports: [{port: NOT_A_NAME}]}]",
        ),
        (
            "bad-operator",
            "matchExpressions",
            "  podSelector: {matchExpressions: [{key: app, operator: Near, values: [a]}]}\n  ingress: [{}]",
        ),
    ];
    for (name, _, spec) in &cases {
        text.push_str(&policy(name, spec));
    }
    // Oversized: 10,000 labels on a pod, 10,000 matchLabels and 500 expressions of 100 values in a selector.
    let mut labels = String::new();
    for i in 0..10_000 {
        let _ = write!(labels, "l{i}: v{i}, ");
    }
    let _ = write!(
        text,
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: big, namespace: x, labels: {{{labels}app: big}}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: 10.244.0.12}}\n"
    );
    let mut exprs = String::new();
    for i in 0..500 {
        let values: Vec<String> = (0..100).map(|v| format!("v{v}")).collect();
        let _ = write!(
            exprs,
            "{{key: k{i}, operator: NotIn, values: [{}]}}, ",
            values.join(", ")
        );
    }
    text.push_str(&policy(
        "huge-selector",
        &format!(
            "  podSelector: {{matchLabels: {{{labels}}}, matchExpressions: [{exprs}]}}\n  ingress: [{{}}]"
        ),
    ));
    // A duplicate object: the later one wins, with an error.
    text.push_str(&policy("good", "  podSelector: {matchLabels: {app: b}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}]}]"));
    // Garbage.
    text.push_str("---\n{{{ not yaml\n");

    let loaded = parse_str("adversarial.yaml", &text);
    let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    for (name, field, _) in &cases {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(&format!("NetworkPolicy x/{name}"))
                    && e.contains(field)
                    && e.contains("adversarial.yaml")),
            "no error naming x/{name} and {field}: {errors:#?}"
        );
    }
    assert!(
        errors.iter().any(|e| e.contains("x/good")),
        "the duplicate is reported: {errors:#?}"
    );

    let cluster = loaded.cluster;
    assert!(
        cluster.pods.contains_key(&ObjectRef::new("x", "big")),
        "a pod with 10,000 labels is still a pod"
    );
    let desired = Engine::new().compile(&cluster);
    let (a, b): (IpAddr, IpAddr) = ("10.244.0.10".parse().unwrap(), "10.244.0.11".parse().unwrap());
    let at_b = |src: IpAddr, port: u16| {
        lookup(
            &desired,
            src,
            b,
            proto::TCP,
            port,
            &ObjectRef::new("x", "b"),
            dir::INGRESS,
        )
    };
    assert!(at_b(a, 80), "the valid policy still allows a -> b:80");
    assert!(!at_b(a, 81), "and nothing more");
    assert!(
        !at_b("10.244.0.12".parse().unwrap(), 80),
        "the big pod is not app=a"
    );
    // Pod a is selected by the broken policies: they fail closed (isolate, allow nothing they could not read).
    let into_a = |port: u16| {
        lookup(
            &desired,
            b,
            a,
            proto::TCP,
            port,
            &ObjectRef::new("x", "a"),
            dir::INGRESS,
        )
    };
    assert!(!into_a(80), "invalid peers and ports do not open pod a");
}
