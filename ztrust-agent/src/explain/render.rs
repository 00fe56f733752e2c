//! The table `explain` prints: the connection and its verdict, a line per hook (with the kernel's
//! answer), then each hook's reasons.

use std::fmt::Write as _;

use super::{End, Explanation, Mode, Side};

fn side(s: &Side) -> String {
    match &s.pod {
        Some(p) => format!("{p} ({})", s.ip),
        None if s.host => format!("{} (the node's)", s.ip),
        None => s.ip.to_string(),
    }
}

fn hook(e: &End) -> String {
    format!("{} of {}", e.direction, e.pod)
}

fn kernel(e: &End) -> String {
    match (&e.kernel, e.here) {
        (Some(k), _) => format!(
            "{} ({}), {} (ifindex {})",
            k.verdict,
            k.reason,
            if k.agrees { "agrees" } else { "DIFFERS" },
            k.ifindex
        ),
        (None, true) if !e.disagreements.is_empty() => "not looked up (see below)".into(),
        (None, true) => "not looked up".into(),
        (None, false) => format!("on {}", e.node.as_deref().unwrap_or("no node yet")),
    }
}

pub(super) fn list<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human form of an explanation.
pub fn render(x: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "From     {}", side(&x.from));
    let _ = writeln!(out, "To       {} port {}/{}", side(&x.to), x.port, x.protocol);
    if let Some(s) = &x.service {
        let backends: Vec<String> = s
            .backends
            .iter()
            .map(|b| match &b.pod {
                Some(p) => format!("{p} {}:{}", b.ip, b.port),
                None => format!("{}:{}", b.ip, b.port),
            })
            .collect();
        let _ = writeln!(
            out,
            "Service  {} → {}",
            list(&s.services),
            if backends.is_empty() {
                "no backend".to_owned()
            } else {
                backends.join(", ")
            }
        );
    }
    let _ = writeln!(out, "Verdict  {}", x.verdict);
    if !x.ends.is_empty() {
        let rows: Vec<[String; 4]> = x
            .ends
            .iter()
            .map(|e| [hook(e), e.verdict.to_string(), e.reason.to_string(), kernel(e)])
            .collect();
        let head = ["HOOK", "VERDICT", "REASON", "KERNEL"];
        let width = |i: usize| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        };
        let (w0, w1, w2) = (width(0), width(1), width(2));
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:w0$}  {:w1$}  {:w2$}  {}",
            head[0], head[1], head[2], head[3]
        );
        for r in &rows {
            let _ = writeln!(out, "{:w0$}  {:w1$}  {:w2$}  {}", r[0], r[1], r[2], r[3]);
        }
    }
    for e in &x.ends {
        let _ = writeln!(out);
        let mode = match e.mode {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit: a denial passes as would-drop",
        };
        let isolation = if e.isolated {
            format!("isolated by {}", list(&e.isolating))
        } else {
            format!("no policy isolates its {}", e.direction)
        };
        let _ = writeln!(out, "{} ({mode}; {isolation})", hook(e));
        let identity = e
            .remote_identity
            .map(|i| format!(", identity {i}"))
            .unwrap_or_default();
        if e.direction == ztrust_common::Direction::Ingress {
            let _ = writeln!(
                out,
                "  remote   from {} ({}{identity}), to port {}",
                e.remote_ip, e.remote, e.port
            );
        } else {
            let _ = writeln!(
                out,
                "  remote   to {}:{} ({}{identity})",
                e.remote_ip, e.port, e.remote
            );
        }
        if let Some(m) = &e.allowed_by {
            let _ = writeln!(
                out,
                "  allowed  by {} {}[{}]: {}; {}",
                m.policy, e.direction, m.index, m.peer, m.port
            );
        }
        for b in &e.backends {
            let who = b.pod.as_ref().map(|p| format!("{p} ")).unwrap_or_default();
            match &b.allowed_by {
                Some(m) => {
                    let _ = writeln!(
                        out,
                        "  backend  {who}{}:{} allowed by {} egress[{}]",
                        b.ip, b.port, m.policy, m.index
                    );
                }
                None if b.allowed => {
                    let _ = writeln!(out, "  backend  {who}{}:{} allowed", b.ip, b.port);
                }
                None => {
                    let _ = writeln!(out, "  backend  {who}{}:{} not allowed by any rule", b.ip, b.port);
                }
            }
        }
        if !e.not_allowed_by.is_empty() {
            let _ = writeln!(out, "  no rule allows it:");
            for m in &e.not_allowed_by {
                let _ = writeln!(out, "    {} {}[{}]: {}", m.policy, e.direction, m.index, m.why);
            }
        } else if e.reason == ztrust_common::Reason::PolicyDenied {
            let _ = writeln!(
                out,
                "  no rule allows it: the isolating policies have no {} rules",
                e.direction
            );
        }
        for d in &e.disagreements {
            let _ = writeln!(out, "  ! {d}");
        }
    }
    if !x.notes.is_empty() {
        let _ = writeln!(out);
        for n in &x.notes {
            let _ = writeln!(out, "note: {n}");
        }
    }
    out
}
