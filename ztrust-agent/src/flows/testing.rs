//! Flows for tests: one denied, one allowed.

use std::collections::BTreeMap;

use crate::flows::{AllowedBy, Endpoint, Flow};
use crate::model::ObjectRef;

/// A dropped TCP SYN from payments/frontend to payments/database:5432, isolated by two policies.
pub fn denied() -> Flow {
    Flow {
        time: humantime::parse_rfc3339("2026-01-01T00:00:00.000Z").unwrap(),
        node: "lab".into(),
        verdict: crate::flows::Verdict::Dropped,
        direction: crate::flows::Direction::Ingress,
        reason: crate::flows::Reason::PolicyDenied,
        endpoint: crate::flows::JudgedAt::Pod(crate::model::ObjectRef::new("payments", "database")),
        protocol: "TCP".into(),
        source: Endpoint {
            ip: "10.244.0.10".parse().unwrap(),
            port: Some(40000),
            namespace: Some("payments".into()),
            pod: Some("frontend-7d9".into()),
            labels: BTreeMap::from([("app".into(), "frontend".into()), ("tier".into(), "web".into())]),
            identity: 300,
        },
        destination: Endpoint {
            ip: "10.244.0.12".parse().unwrap(),
            port: Some(5432),
            namespace: Some("payments".into()),
            pod: Some("database-0".into()),
            labels: BTreeMap::from([
                ("app".into(), "database".into()),
                ("tier".into(), "database".into()),
            ]),
            identity: 301,
        },
        tcp_flags: "SYN".into(),
        policies: vec![
            ObjectRef::new("payments", "default-deny-all"),
            ObjectRef::new("payments", "backend-to-database"),
        ],
        allowed_by: None,
        new_connection: true,
        bytes: 60,
        service: None,
    }
}

/// An allowed UDP flow from shop/web to 8.8.8.8:53 (egress), allowed by shop/allow-dns rule 0.
pub fn allowed() -> Flow {
    Flow {
        time: humantime::parse_rfc3339("2026-01-01T00:00:01.000Z").unwrap(),
        node: "lab".into(),
        verdict: crate::flows::Verdict::Forwarded,
        direction: crate::flows::Direction::Egress,
        reason: crate::flows::Reason::AllowedByPolicy,
        endpoint: crate::flows::JudgedAt::Pod(crate::model::ObjectRef::new("shop", "web")),
        protocol: "UDP".into(),
        source: Endpoint {
            ip: "10.244.1.5".parse().unwrap(),
            port: Some(33333),
            namespace: Some("shop".into()),
            pod: Some("web".into()),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            identity: 400,
        },
        destination: Endpoint {
            ip: "8.8.8.8".parse().unwrap(),
            port: Some(53),
            namespace: None,
            pod: None,
            labels: BTreeMap::new(),
            identity: 1,
        },
        tcp_flags: String::new(),
        policies: vec![],
        allowed_by: Some(AllowedBy {
            policy: crate::model::ObjectRef::new("shop", "allow-dns"),
            direction: crate::flows::Direction::Egress,
            rule: 0,
        }),
        new_connection: true,
        bytes: 70,
        service: None,
    }
}
