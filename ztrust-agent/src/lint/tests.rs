use super::*;
use crate::source::dir;

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  containers:
  - name: web
    ports: [{name: http, containerPort: 8080}]
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  containers:
  - name: db
    ports: [{name: pg, containerPort: 5432}]
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
"#;

const DEFAULT_DENY: &str = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
      podSelector: {matchLabels: {k8s-app: kube-dns}}
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
"#;

/// The findings for these manifests (one text), as (code, object, field).
fn run(yaml: &str) -> Vec<(String, String, String)> {
    let loaded = dir::parse_str("test.yaml", yaml);
    lint(&loaded.cluster, &loaded.errors)
        .into_iter()
        .map(|f| (f.code.to_owned(), f.object, f.field))
        .collect()
}

fn codes(yaml: &str) -> Vec<String> {
    run(yaml).into_iter().map(|(c, ..)| c).collect()
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}\n"
    )
}

#[test]
fn a_namespace_with_default_deny_and_dns_has_no_findings() {
    assert_eq!(run(&format!("{PODS}{DEFAULT_DENY}")), vec![]);
}

#[test]
fn namespaces_without_default_deny() {
    let found = run(PODS);
    assert_eq!(
        found,
        vec![
            ("ZT001".into(), "Namespace shop".into(), String::new()),
            ("ZT002".into(), "Namespace shop".into(), String::new()),
        ]
    );
    // Ingress only: egress is still open.
    let ingress_only = policy("deny-in", "  podSelector: {}\n  policyTypes: [Ingress]");
    assert_eq!(codes(&format!("{PODS}{ingress_only}")), vec!["ZT002"]);
    // A policy for one pod leaves the other open.
    let web_only = policy(
        "web",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]",
    );
    let f = lint(
        &dir::parse_str("t.yaml", &format!("{PODS}{web_only}")).cluster,
        &[],
    );
    let zt001 = f.iter().find(|f| f.code == "ZT001").expect("db is open");
    assert!(
        zt001.message.contains("1 of 2") && zt001.message.contains("db"),
        "{}",
        zt001.message
    );
}

#[test]
fn isolated_egress_without_a_dns_rule() {
    let deny = policy(
        "default-deny",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]",
    );
    let found = run(&format!("{PODS}{deny}"));
    assert_eq!(
        found,
        vec![(
            "ZT003".into(),
            "NetworkPolicy shop/default-deny".into(),
            "spec.egress".into()
        )]
    );
    // TCP 53 alone is no DNS path.
    let tcp = policy(
        "tcp-dns",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{protocol: TCP, port: 53}]",
    );
    assert!(codes(&format!("{PODS}{deny}{tcp}")).contains(&"ZT003".to_owned()));
    // Every port, but only to pods that serve no DNS: no DNS path either.
    let to_db = policy(
        "all-to-db",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}]",
    );
    assert!(codes(&format!("{PODS}{deny}{to_db}")).contains(&"ZT003".to_owned()));
    // To the cluster's DNS pods (not in these manifests), by a named port too when a pod declares it
    // as UDP 53.
    let kube_dns = "    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}\n      podSelector: {matchLabels: {k8s-app: kube-dns}}";
    let by_number = policy(
        "dns-by-number",
        &format!(
            "  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n{kube_dns}\n    ports: [{{protocol: UDP, port: 53}}]"
        ),
    );
    assert!(!codes(&format!("{PODS}{deny}{by_number}")).contains(&"ZT003".to_owned()));
    let by_name = policy(
        "dns-by-name",
        &format!(
            "  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n{kube_dns}\n    ports: [{{protocol: UDP, port: dns}}]"
        ),
    );
    assert!(
        codes(&format!("{PODS}{deny}{by_name}")).contains(&"ZT003".to_owned()),
        "no pod declares dns"
    );
    let coredns = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  containers:
  - name: coredns
    ports: [{name: dns, containerPort: 53, protocol: UDP}]
status: {podIP: 10.244.0.2}
"#;
    assert!(!codes(&format!("{PODS}{coredns}{deny}{by_name}")).contains(&"ZT003".to_owned()));
}

#[test]
fn dns_to_anywhere_as_the_seeds_allow_dns() {
    let seed = policy(
        "allow-dns",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{protocol: TCP, port: 53}, {protocol: UDP, port: 53}]",
    );
    let found = run(&format!("{PODS}{DEFAULT_DENY}{seed}"));
    assert_eq!(
        found,
        vec![
            (
                "ZT004".into(),
                "NetworkPolicy shop/allow-dns".into(),
                "spec.egress[0]".into()
            ),
            // And it covers the rule to the cluster's DNS, which now changes nothing.
            (
                "ZT008".into(),
                "NetworkPolicy shop/dns".into(),
                "spec.egress[0]".into()
            ),
        ]
    );
    // An except does not make it the cluster's DNS.
    let carved = policy(
        "dns-public",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]\n    ports: [{protocol: UDP, port: 53}]",
    );
    assert!(codes(&format!("{PODS}{DEFAULT_DENY}{carved}")).contains(&"ZT004".to_owned()));
    let everything = policy(
        "dns-ipblock",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 0.0.0.0/0}}]\n    ports: [{protocol: UDP, port: 53}]",
    );
    assert!(codes(&format!("{PODS}{DEFAULT_DENY}{everything}")).contains(&"ZT004".to_owned()));
}

#[test]
fn a_policy_selecting_no_pod() {
    let typo = policy(
        "typo",
        "  podSelector: {matchLabels: {app: wbe}}\n  policyTypes: [Ingress]",
    );
    let found = run(&format!("{PODS}{DEFAULT_DENY}{typo}"));
    assert_eq!(
        found,
        vec![(
            "ZT005".into(),
            "NetworkPolicy shop/typo".into(),
            "spec.podSelector".into()
        )]
    );
    // Policies alone (no pods known): nothing to say.
    assert_eq!(codes(&typo), Vec::<String>::new());
}

#[test]
fn named_ports_no_pod_declares() {
    let ingress = policy(
        "to-web",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress:\n  - ports: [{port: http}, {port: htp}, {port: http, protocol: UDP}]",
    );
    let found = run(&format!("{PODS}{DEFAULT_DENY}{ingress}"));
    let fields: Vec<&str> = found.iter().map(|(_, _, f)| f.as_str()).collect();
    assert_eq!(
        fields,
        vec!["spec.ingress[0].ports[1].port", "spec.ingress[0].ports[2].port"],
        "{found:?}"
    );
    // Egress: the peers' ports (db declares pg, web does not).
    let egress = policy(
        "web-to-db",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}]\n    ports: [{port: pg}]\n  - to: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: pg}]",
    );
    let found = run(&format!("{PODS}{DEFAULT_DENY}{egress}"));
    assert_eq!(
        found,
        vec![(
            "ZT006".into(),
            "NetworkPolicy shop/web-to-db".into(),
            "spec.egress[1].ports[0].port".into()
        )]
    );
}

#[test]
fn ipblocks_over_pod_or_service_addresses() {
    let wide = policy(
        "wide",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8}}]",
    );
    let found = run(&format!("{PODS}{DEFAULT_DENY}{wide}"));
    assert_eq!(
        found,
        vec![(
            "ZT007".into(),
            "NetworkPolicy shop/wide".into(),
            "spec.ingress[0].from[0].ipBlock".into()
        )]
    );
    let carved = policy(
        "carved",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.0/16, 10.96.0.0/12]}}]",
    );
    assert_eq!(
        codes(&format!("{PODS}{DEFAULT_DENY}{carved}")),
        Vec::<String>::new()
    );
}

#[test]
fn rules_another_rule_covers() {
    let dup = policy(
        "dup",
        "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]",
    );
    let found = run(&format!("{PODS}{DEFAULT_DENY}{dup}"));
    assert_eq!(
        found,
        vec![(
            "ZT008".into(),
            "NetworkPolicy shop/dup".into(),
            "spec.ingress[1]".into()
        )]
    );
    // An allow-all rule for the same pods, in another policy, covers the narrow one.
    let narrow = policy(
        "narrow",
        "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]",
    );
    let open = policy(
        "open",
        "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n  ingress:\n  - {}",
    );
    let found = run(&format!("{PODS}{DEFAULT_DENY}{narrow}{open}"));
    assert_eq!(
        found,
        vec![(
            "ZT008".into(),
            "NetworkPolicy shop/narrow".into(),
            "spec.ingress[0]".into()
        )]
    );
    // Different rules: nothing.
    let two = policy(
        "two",
        "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n  - ports: [{port: 5432}]",
    );
    assert_eq!(codes(&format!("{PODS}{DEFAULT_DENY}{two}")), Vec::<String>::new());
}

#[test]
fn rules_of_a_direction_policy_types_leave_out() {
    let egress_ignored = policy(
        "ingress-only",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}]",
    );
    let found = run(&format!("{PODS}{DEFAULT_DENY}{egress_ignored}"));
    assert_eq!(
        found,
        vec![(
            "ZT009".into(),
            "NetworkPolicy shop/ingress-only".into(),
            "spec.policyTypes".into()
        )]
    );
    let ingress_ignored = policy(
        "egress-only",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  ingress:\n  - {}\n  egress:\n  - {}",
    );
    assert_eq!(
        codes(&format!("{PODS}{DEFAULT_DENY}{ingress_ignored}")),
        vec!["ZT010"]
    );
    // Without policyTypes, egress rules make the policy affect egress: nothing to say.
    let defaulted = policy(
        "defaulted",
        "  podSelector: {matchLabels: {app: web}}\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}]",
    );
    assert_eq!(
        codes(&format!("{PODS}{DEFAULT_DENY}{defaulted}")),
        Vec::<String>::new()
    );
}

#[test]
fn an_object_the_source_cannot_convert_is_a_finding_naming_its_field() {
    let bad = policy(
        "bad-cidr",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/33}}]",
    );
    let loaded = dir::parse_str("bad.yaml", &format!("{PODS}{DEFAULT_DENY}{bad}"));
    let found = lint(&loaded.cluster, &loaded.errors);
    let f = found.iter().find(|f| f.code == "ZT000").expect("the bad CIDR");
    assert_eq!(f.severity, Severity::Error);
    assert!(f.object.contains("shop/bad-cidr"), "{f:?}");
    assert!(f.field.contains("ipBlock"), "{f:?}");
    assert!(f.message.contains("bad.yaml"), "{f:?}");
}

#[test]
fn workloads_are_linted_as_the_pods_they_run() {
    let tmp = std::env::temp_dir().join(format!("ztrust-lint-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let deployment = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers:
      - name: api
        ports: [{name: grpc, containerPort: 9000}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
"#;
    let to_api = policy(
        "to-api",
        "  podSelector: {matchLabels: {app: api}}\n  policyTypes: [Ingress]\n  ingress:\n  - ports: [{port: grpc}, {port: rest}]",
    );
    let more = r#"
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: pg, namespace: shop}
spec:
  template:
    metadata: {labels: {app: pg}}
    spec: {containers: [{name: pg, ports: [{name: pg, containerPort: 5432}]}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: backup, namespace: shop}
spec:
  jobTemplate:
    spec:
      template:
        metadata: {labels: {app: backup}}
        spec: {containers: [{name: backup}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {namespace: shop}
spec: {template: {metadata: {labels: {app: nameless}}}}
"#;
    std::fs::write(tmp.join("app.yaml"), format!("{deployment}{more}")).unwrap();
    std::fs::write(tmp.join("policies.yaml"), format!("{DEFAULT_DENY}{to_api}")).unwrap();
    let (cluster, errors) = load_dir(&tmp).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(
        errors.is_empty(),
        "kinds lint does not read say nothing: {errors:?}"
    );
    // A pod per named workload (the nameless one is none); the namespace they name exists.
    let names: Vec<&str> = cluster.pods.values().map(|p| p.name.as_str()).collect();
    assert_eq!(names, vec!["api", "backup", "pg"]);
    assert!(cluster.namespaces.contains_key("shop"));
    let found: Vec<(String, String)> = lint(&cluster, &errors)
        .into_iter()
        .map(|f| (f.code.to_owned(), f.field))
        .collect();
    // The Deployment's pod is selected (no ZT005) and declares grpc, not rest.
    assert_eq!(
        found,
        vec![("ZT006".into(), "spec.ingress[0].ports[1].port".into())]
    );
}

#[test]
fn every_check_has_a_stable_distinct_code() {
    let codes: BTreeSet<&str> = CHECKS.iter().map(|c| c.code).collect();
    assert_eq!(codes.len(), CHECKS.len());
    assert!(CHECKS.windows(2).all(|w| w[0].code < w[1].code));
}

#[test]
fn a_namespace_wide_rule_covers_the_same_rule_of_a_narrower_policy_whatever_the_order() {
    let wide = policy(
        "dns-all",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{protocol: TCP, port: 53}, {protocol: UDP, port: 53}]",
    );
    let narrow = policy(
        "web-dns",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]",
    );
    let loaded = dir::parse_str("t.yaml", &format!("{PODS}{DEFAULT_DENY}{wide}{narrow}"));
    let redundant: Vec<(String, String)> = lint(&loaded.cluster, &loaded.errors)
        .into_iter()
        .filter(|f| f.code == "ZT008")
        .map(|f| (f.object, f.message))
        .collect();
    // dns-all covers web-dns (wider selector, same ports in another order) and the rule to kube-dns;
    // nothing covers dns-all.
    assert_eq!(
        redundant,
        vec![
            (
                "NetworkPolicy shop/dns".to_owned(),
                "covered by shop/dns-all spec.egress[0]".to_owned()
            ),
            (
                "NetworkPolicy shop/web-dns".to_owned(),
                "covered by shop/dns-all spec.egress[0]".to_owned()
            ),
        ]
    );
}

#[test]
fn named_ports_to_addresses_outside_the_cluster_match_nothing() {
    let out = policy(
        "web-out",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 203.0.113.0/24}}]\n    ports: [{port: https}]\n  - to: [{ipBlock: {cidr: 10.244.0.0/24}}]\n    ports: [{port: pg}]",
    );
    let loaded = dir::parse_str("t.yaml", &format!("{PODS}{DEFAULT_DENY}{out}"));
    let found: Vec<(String, String)> = lint(&loaded.cluster, &loaded.errors)
        .into_iter()
        .filter(|f| f.code == "ZT006")
        .map(|f| (f.field, f.message))
        .collect();
    // The second names pods by address (db declares pg): it resolves, as the engine resolves it.
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "spec.egress[0].ports[0].port");
    assert!(found[0].1.contains("outside the cluster"), "{}", found[0].1);
}

#[test]
fn an_ipblock_over_the_service_range_of_the_live_cluster() {
    let wide = policy(
        "wide",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.64.0.0/10}}]",
    );
    // 10.64.0.0/10 holds the Service's address too: without it, only the range says so.
    let without_svc = PODS.split("\n---\napiVersion: v1\nkind: Service").next().unwrap();
    let mut loaded = dir::parse_str("t.yaml", &format!("{without_svc}{DEFAULT_DENY}{wide}"));
    assert!(loaded.cluster.services.is_empty());
    assert!(!codes(&format!("{without_svc}{DEFAULT_DENY}{wide}")).contains(&"ZT007".to_owned()));
    loaded.cluster.service_cidrs = vec!["10.96.0.0/12".parse().unwrap()];
    let f = lint(&loaded.cluster, &loaded.errors);
    let zt007 = f
        .iter()
        .find(|f| f.code == "ZT007")
        .expect("overlaps 10.96.0.0/12");
    assert!(zt007.message.contains("10.96.0.0/12"), "{}", zt007.message);
}

#[test]
fn a_policy_of_a_namespace_whose_pods_the_source_lacks_says_nothing() {
    let elsewhere = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: typo, namespace: other}
spec: {podSelector: {matchLabels: {app: nothing}}, policyTypes: [Ingress]}
"#;
    assert!(!codes(&format!("{PODS}{DEFAULT_DENY}{elsewhere}")).contains(&"ZT005".to_owned()));
}

#[test]
fn findings_name_their_namespace_for_exclusion() {
    let loaded = dir::parse_str("t.yaml", PODS);
    let f = lint(&loaded.cluster, &loaded.errors);
    assert!(f.iter().all(|f| f.namespace == "shop"), "{f:?}");
    let typo = policy(
        "typo",
        "  podSelector: {matchLabels: {app: wbe}}\n  policyTypes: [Ingress]",
    );
    let loaded = dir::parse_str("t.yaml", &format!("{PODS}{typo}"));
    let f = lint(&loaded.cluster, &loaded.errors);
    let zt005 = f.iter().find(|f| f.code == "ZT005").unwrap();
    assert_eq!(zt005.namespace, "shop");
}
