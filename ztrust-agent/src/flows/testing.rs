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
        protocol: crate::flows::IpProtocol::TCP,
        source: Endpoint {
            ip: "10.244.0.10".parse().unwrap(),
            port: Some(40000),
            pod: Some(crate::model::ObjectRef::new("payments", "frontend-7d9")),
            labels: BTreeMap::from([("app".into(), "frontend".into()), ("tier".into(), "web".into())]),
            identity: 300,
        },
        destination: Endpoint {
            ip: "10.244.0.12".parse().unwrap(),
            port: Some(5432),
            pod: Some(crate::model::ObjectRef::new("payments", "database-0")),
            labels: BTreeMap::from([
                ("app".into(), "database".into()),
                ("tier".into(), "database".into()),
            ]),
            identity: 301,
        },
        tcp_flags: crate::flows::TcpFlags(ztrust_common::tcp_flags::SYN),
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
        protocol: crate::flows::IpProtocol::UDP,
        source: Endpoint {
            ip: "10.244.1.5".parse().unwrap(),
            port: Some(33333),
            pod: Some(crate::model::ObjectRef::new("shop", "web")),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            identity: 400,
        },
        destination: Endpoint {
            ip: "8.8.8.8".parse().unwrap(),
            port: Some(53),
            pod: None,
            labels: BTreeMap::new(),
            identity: 1,
        },
        tcp_flags: crate::flows::TcpFlags::default(),
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
