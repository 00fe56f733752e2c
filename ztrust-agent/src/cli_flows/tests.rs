use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    flows: FlowsArgs,
}

fn parse(args: &[&str]) -> FlowsArgs {
    Cli::try_parse_from(std::iter::once("flows").chain(args.iter().copied()))
        .unwrap()
        .flows
}

#[test]
fn options_become_one_and_filter() {
    let req = parse(&[
        "--denied",
        "--from-pod",
        "shop/web",
        "--port",
        "5432",
        "--protocol",
        "tcp",
    ])
    .request()
    .unwrap();
    assert_eq!(req.number, 20);
    assert!(!req.follow);
    let f = &req.whitelist[0];
    assert_eq!(f.verdict, [Verdict::Dropped as i32, Verdict::WouldDrop as i32]);
    assert_eq!(f.source_pod, ["shop/web"]);
    assert_eq!(f.destination_port, ["5432"]);
    assert_eq!(f.protocol, ["tcp"]);
    assert!(req.blacklist.is_empty());
}

#[test]
fn history_defaults() {
    assert!(parse(&[]).request().unwrap().whitelist.is_empty());
    assert_eq!(parse(&["-f"]).request().unwrap().number, 0);
    assert_eq!(parse(&["--last", "5", "-f"]).request().unwrap().number, 5);
    let r = parse(&["--since", "5m"]).request().unwrap();
    assert_eq!(r.number, 0);
    let since = convert::system_time(r.since.as_ref().unwrap());
    let ago = SystemTime::now().duration_since(since).unwrap();
    assert!(
        ago >= Duration::from_secs(299) && ago <= Duration::from_secs(301),
        "{ago:?}"
    );
    let r = parse(&["--all", "-f"]).request().unwrap();
    assert_eq!(r.since, Some(convert::timestamp(SystemTime::UNIX_EPOCH)));
}

#[test]
fn invalid_options_are_refused_early() {
    assert!(parse(&["--verdict", "maybe"]).request().is_err());
    assert!(parse(&["--to-ip", "10.0.0.0/40"]).request().is_err());
    assert!(parse(&["--port", "http"]).request().is_err());
    assert!(parse(&["--since", "yesterday-ish"]).request().is_err());
    assert!(parse(&["--reason", "because"]).request().is_err());
    assert_eq!(
        parse(&["--reason", "policy-denied"]).request().unwrap().whitelist[0].reason,
        [64]
    );
}

#[test]
fn table_columns_align() {
    let flows = [crate::flows::testing::denied(), crate::flows::testing::allowed()];
    let mut p = Printer::new(Output::Table);
    p.colour = false;
    p.fit(&flows);
    let mut out = Vec::new();
    for f in &flows {
        p.flow(&mut out, f, None).unwrap();
    }
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let col = |l: &str, name: &str| l.find(name).unwrap();
    assert_eq!(
        col(lines[0], "DESTINATION"),
        col(lines[1], "payments/database-0:5432"),
        "{text}"
    );
    assert_eq!(
        col(lines[0], "DESTINATION"),
        col(lines[2], "8.8.8.8:53"),
        "{text}"
    );
    assert_eq!(
        col(lines[0], "REASON"),
        col(lines[2], "allowed-by-policy"),
        "{text}"
    );
    assert!(!text.contains('\x1b'));
}

#[test]
fn a_connection_to_a_service_is_shown_by_the_service_and_its_backend() {
    let mut f = crate::flows::testing::denied();
    f.destination.pod = None;
    f.destination.ip = "10.96.30.147".parse().unwrap();
    f.destination.port = Some(80);
    f.service = Some(crate::flows::ServiceRef {
        name: "payments/database".parse().unwrap(),
        backends: vec!["payments/database-0".parse().unwrap()],
    });
    assert_eq!(cells(&f)[3], "svc payments/database:80 → payments/database-0");
    f.service
        .as_mut()
        .unwrap()
        .backends
        .push("payments/database-1".parse().unwrap());
    assert_eq!(cells(&f)[3], "svc payments/database:80 (2 backends)");
}

#[test]
fn jsonl_is_one_flow_per_line() {
    let mut p = Printer::new(Output::Jsonl);
    let mut out = Vec::new();
    p.flow(&mut out, &crate::flows::testing::denied(), Some(41))
        .unwrap();
    p.flow(&mut out, &crate::flows::testing::allowed(), None).unwrap();
    let text = String::from_utf8(out).unwrap();
    let back: Vec<Flow> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(back.len(), 2);
    assert_eq!(back[0].destination.port, Some(5432));
    let ids: Vec<Option<u64>> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_u64())
        .collect();
    assert_eq!(ids, [Some(41), None], "the agent's number, when known");
}

#[test]
fn the_table_numbers_the_agents_flows_for_explain() {
    let mut p = Printer::new(Output::Table).with_ids();
    p.colour = false;
    let mut out = Vec::new();
    p.flow(&mut out, &crate::flows::testing::denied(), Some(12345))
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert!(lines[0].starts_with("ID     TIME"), "{text}");
    assert!(lines[1].starts_with("12345  "), "{text}");
}
