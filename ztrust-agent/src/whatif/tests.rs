use super::*;
use crate::flows::testing::denied;
use crate::source::dir;

fn payments() -> Cluster {
    let mut c = dir::parse_str("payments.yaml", crate::explain::tests::PAYMENTS).cluster;
    c.node_ips = vec!["192.168.1.10".parse().unwrap()];
    c.service_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
    c
}

/// A recorded flow of a new connection `src` → `dst:port` over TCP with `verdict`.
fn flow(src: &str, dst: &str, port: u16, verdict: Verdict) -> Flow {
    let mut f = denied();
    f.source.ip = src.parse().unwrap();
    f.destination.ip = dst.parse().unwrap();
    f.destination.port = Some(port);
    f.verdict = verdict;
    f.reason = if verdict == Verdict::Forwarded {
        Reason::AllowedByPolicy
    } else {
        Reason::PolicyDenied
    };
    f
}

const FRONTEND: &str = "10.244.0.10";
const BACKEND: &str = "10.244.0.11";
const DATABASE: &str = "10.244.0.12";

fn recorded() -> Vec<Flow> {
    let mut flows = vec![
        flow(FRONTEND, BACKEND, 8080, Verdict::Forwarded),
        flow(FRONTEND, BACKEND, 8080, Verdict::Forwarded),
        flow(FRONTEND, DATABASE, 5432, Verdict::Dropped),
        flow(BACKEND, DATABASE, 5432, Verdict::Forwarded),
        // Through the backend Service's ClusterIP.
        flow(FRONTEND, "10.96.0.21", 80, Verdict::Forwarded),
    ];
    // A reply is no connection of its own.
    let mut reply = flow(BACKEND, FRONTEND, 40000, Verdict::Forwarded);
    reply.reason = Reason::Reply;
    flows.push(reply);
    flows
}

fn draft(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("draft.yaml"), yaml).unwrap();
    dir
}

#[test]
fn deleting_an_allow_policy_shows_the_connections_it_would_drop() {
    let before = payments();
    let del = [ObjectRef::new("payments", "backend-ingress")];
    let (after, summary) = apply_draft(&before, None, &del).unwrap();
    assert_eq!(summary.deleted, del);
    let r = replay(&before, &after, summary, &recorded());
    assert_eq!((r.flows_read, r.flows_replayed, r.connections), (6, 5, 4));
    assert_eq!(
        r.recorded_otherwise, 0,
        "the recorded verdicts are the current policies': {r:?}"
    );
    let changed: Vec<(&str, &str, u16, Verdict, usize)> = r
        .changed
        .iter()
        .map(|c| (c.from.as_str(), c.to.as_str(), c.port, c.after, c.flows))
        .collect();
    assert_eq!(
        changed,
        [
            ("payments/frontend", "10.96.0.21", 80, Verdict::Dropped, 1),
            ("payments/frontend", "payments/backend", 8080, Verdict::Dropped, 2),
        ],
        "{}",
        render(&r)
    );
    assert_eq!(r.changed[1].reason, Reason::PolicyDenied);
    assert_eq!(
        r.changed[1].policies,
        [ObjectRef::new("payments", "default-deny-all")]
    );
    assert_eq!(r.newly_dropped(), 2);
    let text = render(&r);
    assert!(text.contains("forwarded → dropped"), "{text}");
    assert!(
        text.contains("5 replayed (4 connections): 2 change verdict, 2 of them newly dropped"),
        "{text}"
    );
}

#[test]
fn an_added_policy_opens_what_it_allows_and_nothing_else() {
    let before = payments();
    let d = draft(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: frontend-db, namespace: payments}\n\
         spec:\n  podSelector: {matchLabels: {app: database}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: frontend}}}], ports: [{port: 5432}]}]\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: frontend-egress, namespace: payments}\n\
         spec:\n  podSelector: {matchLabels: {app: frontend}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: backend}}}, {podSelector: {matchLabels: {app: database}}}]}]\n",
    );
    let (after, summary) = apply_draft(&before, Some(d.path()), &[]).unwrap();
    assert_eq!(summary.added, [ObjectRef::new("payments", "frontend-db")]);
    assert_eq!(summary.changed, [ObjectRef::new("payments", "frontend-egress")]);
    let r = replay(&before, &after, summary, &recorded());
    assert_eq!(r.changed.len(), 1, "{}", render(&r));
    let c = &r.changed[0];
    assert_eq!(
        (c.to.as_str(), c.before, c.after),
        ("payments/database", Verdict::Dropped, Verdict::Forwarded)
    );
    assert_eq!(r.newly_dropped(), 0);
}

#[test]
fn a_malformed_draft_is_an_error_naming_the_object_and_field() {
    let before = payments();
    let d = draft(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: payments}\n\
         spec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
    );
    let e = apply_draft(&before, Some(d.path()), &[]).unwrap_err().to_string();
    assert!(
        e.contains("NetworkPolicy payments/bad") && e.contains("spec.ingress[0].from[0].ipBlock.cidr"),
        "{e}"
    );
    let d = draft("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n");
    assert!(matches!(
        apply_draft(&before, Some(d.path()), &[]),
        Err(DraftError::Empty)
    ));
    let e = apply_draft(&before, None, &[ObjectRef::new("payments", "nope")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--delete payments/nope: the cluster has no such NetworkPolicy"
    );
}

#[test]
fn flows_judged_otherwise_when_recorded_are_counted() {
    let before = payments();
    let (after, summary) = apply_draft(&before, None, &[]).unwrap();
    // Recorded as forwarded, yet the current policies drop frontend → database.
    let r = replay(
        &before,
        &after,
        summary,
        &[flow(FRONTEND, DATABASE, 5432, Verdict::Forwarded)],
    );
    assert!(r.changed.is_empty());
    assert_eq!(r.recorded_otherwise, 1);
    assert!(render(&r).contains("judged otherwise when recorded"));
}
