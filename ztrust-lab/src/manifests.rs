//! Manifests as the lab handles them: raw objects (copied into `manifests/` with pod addresses filled in)
//! next to their [`ztrust_agent::model`] conversion (the same one the agent's `dir:` source does).
//!
//! The lab's own object, `ExternalHost`, is a host outside the cluster that pods can reach through the
//! node (a payment gateway, an API on the internet):
//!
//! ```yaml
//! apiVersion: lab.ztrust.io/v1
//! kind: ExternalHost
//! metadata: {name: payment-gateway}
//! spec:
//!   ip: 203.0.113.10            # or ips: [203.0.113.10, "2001:db8::10"]
//!   ports: [{port: 443, protocol: TCP}]
//! ```

use std::net::IpAddr;
use std::path::Path;

use serde_json::{Value, json};

use super::{Error, Result, io_err};
use ztrust_agent::model::{self, ContainerPort, Protocol};
use ztrust_agent::source::dir;
use ztrust_agent::source::{Effect, ObjectError, Problem};

pub const LAB_API_PREFIX: &str = "lab.ztrust.io/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
    ExternalHost,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Service => "Service",
            Kind::ExternalHost => "ExternalHost",
        }
    }
}

/// One object as written in a manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct RawObject {
    pub kind: Kind,
    /// Empty for cluster-scoped objects (Namespace, ExternalHost).
    pub namespace: String,
    pub name: String,
    pub value: Value,
    pub file: String,
}

impl RawObject {
    /// `Kind namespace/name`, for messages.
    pub fn display(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind.as_str(), self.name)
        } else {
            format!("{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }

    /// Its file in the lab's `manifests/`: `<kind>-<namespace>-<name>.yaml` (`namespace-<name>.yaml` for a
    /// Namespace). Kubernetes names are lowercase, so this cannot clash with an uppercase kind.
    pub fn file_name(&self) -> String {
        file_name(self.kind, &self.namespace, &self.name)
    }

    pub fn key(&self) -> (Kind, String, String) {
        (self.kind, self.namespace.clone(), self.name.clone())
    }
}

pub fn file_name(kind: Kind, namespace: &str, name: &str) -> String {
    let kind = kind.as_str().to_ascii_lowercase();
    if namespace.is_empty() {
        format!("{kind}-{name}.yaml")
    } else {
        format!("{kind}-{namespace}-{name}.yaml")
    }
}

/// What a file or directory holds: the objects the lab knows, and notes about what it skipped.
#[derive(Clone, Debug, Default)]
pub struct Read {
    pub objects: Vec<RawObject>,
    pub skipped: Vec<String>,
}

/// Reads a manifest file, or every manifest file under a directory ([`dir::manifest_files`]).
/// Multi-document files and `kind: List` are expanded ([`dir::documents`]). A later definition of the
/// same object wins.
pub fn read_path(path: &Path) -> Result<Read> {
    let files = dir::manifest_files(path).map_err(io_err(format!("reading {}", path.display())))?;
    let mut out = Read::default();
    for file in files {
        let file = file.path;
        let text = std::fs::read_to_string(&file).map_err(io_err(format!("reading {}", file.display())))?;
        let read = parse_text(&file.display().to_string(), &text)?;
        for o in read.objects {
            out.objects.retain(|x| x.key() != o.key());
            out.objects.push(o);
        }
        out.skipped.extend(read.skipped);
    }
    Ok(out)
}

/// The objects of one file's text; a syntax error fails the whole file, a malformed `List` is skipped.
pub fn parse_text(file: &str, text: &str) -> Result<Read> {
    let mut out = Read::default();
    let (documents, errors) = dir::documents(text);
    for e in errors {
        if let Problem::Syntax(_) = e.problem {
            return Err(Error::Manifest {
                file: file.to_owned(),
                problem: e.problem,
            });
        }
        out.skipped.push(format!("{file}: {e}; skipped"));
    }
    for d in documents {
        add(file, d.value, &mut out);
    }
    Ok(out)
}

fn add(file: &str, value: Value, out: &mut Read) {
    let api = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let kind = match (api.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Kind::Namespace,
        ("v1", "Pod") => Kind::Pod,
        ("networking.k8s.io/v1", "NetworkPolicy") => Kind::NetworkPolicy,
        ("v1", "Service") => Kind::Service,
        (a, "ExternalHost") if a.starts_with(LAB_API_PREFIX) => Kind::ExternalHost,
        _ => {
            out.skipped.push(format!(
                "{file}: {api} {kind} is not something the lab runs; skipped"
            ));
            return;
        }
    };
    let meta = value.get("metadata");
    let Some(name) = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        out.skipped.push(format!(
            "{file}: a {} without metadata.name; skipped",
            kind.as_str()
        ));
        return;
    };
    let namespace = match kind {
        Kind::Namespace | Kind::ExternalHost => String::new(),
        _ => meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned(),
    };
    let mut value = value;
    if !namespace.is_empty() {
        // The copy is read without its original context: make the namespace explicit.
        value["metadata"]["namespace"] = json!(namespace);
    }
    out.objects.push(RawObject {
        kind,
        namespace,
        name,
        value,
        file: file.to_owned(),
    });
}

/// The pod as the policy engine sees it (the `dir:` source's conversion), and what was wrong with it.
pub fn pod_model(obj: &RawObject) -> (Option<model::Pod>, Vec<String>) {
    let text = serde_json::to_string(&obj.value).expect("a JSON value serializes");
    let loaded = dir::parse_str(&obj.file, &text);
    let warnings = loaded.errors.iter().map(ToString::to_string).collect();
    (loaded.cluster.pods.into_values().next(), warnings)
}

/// An `ExternalHost` read from its raw object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalHost {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<ContainerPort>,
}

pub fn external_host(obj: &RawObject) -> Result<ExternalHost> {
    let invalid = |field: String, problem: Problem| {
        Error::Object(ObjectError {
            object: obj.display(),
            field,
            problem,
            // `up` and `apply` stop at it: nothing is ignored.
            effect: Effect::None,
        })
    };
    let spec = obj
        .value
        .get("spec")
        .ok_or_else(|| invalid("spec".into(), Problem::Missing))?;
    let mut texts: Vec<(String, &Value)> = Vec::new();
    if let Some(ip) = spec.get("ip") {
        texts.push(("spec.ip".into(), ip));
    }
    for (i, ip) in spec
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        texts.push((format!("spec.ips[{i}]"), ip));
    }
    let mut ips = Vec::new();
    for (field, value) in texts {
        let ip: IpAddr = value
            .as_str()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| invalid(field, Problem::BadIp(shown(value))))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Err(invalid("spec.ip".into(), Problem::Missing));
    }
    let mut ports = Vec::new();
    for (i, p) in spec
        .get("ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let field = format!("spec.ports[{i}].port");
        let number = p
            .get("port")
            .ok_or_else(|| invalid(field.clone(), Problem::Missing))?;
        let port = number
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0)
            .ok_or_else(|| {
                invalid(
                    field,
                    number.as_i64().map_or_else(
                        || Problem::Schema {
                            kind: "ExternalHost",
                            message: format!("port {} is not a number", shown(number)),
                        },
                        Problem::PortRange,
                    ),
                )
            })?;
        let protocol = match p.get("protocol").and_then(Value::as_str) {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(other) => {
                return Err(invalid(
                    format!("spec.ports[{i}].protocol"),
                    Problem::Protocol(other.to_owned()),
                ));
            }
        };
        let name = p.get("name").and_then(Value::as_str).map(str::to_owned);
        ports.push(ContainerPort { name, port, protocol });
    }
    Ok(ExternalHost {
        name: obj.name.clone(),
        ips,
        ports,
    })
}

/// A JSON value as a manifest shows it: a string without quotes, anything else as JSON.
fn shown(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_owned)
}

/// Fills `status.podIP` and `status.podIPs` (and `phase: Running`) as the kubelet would report them.
pub fn set_pod_ips(value: &mut Value, ips: &[IpAddr]) {
    if !value.get("status").is_some_and(Value::is_object) {
        value["status"] = json!({});
    }
    let status = &mut value["status"];
    status["phase"] = json!("Running");
    if let Some(first) = ips.first() {
        status["podIP"] = json!(first.to_string());
    }
    status["podIPs"] = Value::Array(ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect());
}

/// `spec.nodeName`: the node the lab put the pod on, as the scheduler writes it.
pub fn set_pod_node(value: &mut Value, node: &str) {
    if !value.get("spec").is_some_and(Value::is_object) {
        value["spec"] = json!({});
    }
    value["spec"]["nodeName"] = json!(node);
}

/// Sets (`Some`) or removes (`None`) one label.
pub fn set_label(value: &mut Value, key: &str, new: Option<&str>) {
    if !value.get("metadata").is_some_and(Value::is_object) {
        value["metadata"] = json!({});
    }
    let meta = &mut value["metadata"];
    if !meta.get("labels").is_some_and(Value::is_object) {
        meta["labels"] = json!({});
    }
    let labels = meta["labels"].as_object_mut().expect("made an object above");
    match new {
        Some(v) => {
            labels.insert(key.to_owned(), json!(v));
        }
        None => {
            labels.remove(key);
        }
    }
}

/// The object as YAML, for its copy in `manifests/`.
pub fn to_yaml(value: &Value) -> String {
    serde_yaml::to_string(value).expect("a JSON value serializes as YAML")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: payments, labels: {kubernetes.io/metadata.name: payments}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web, labels: {app: web}}
  spec: {containers: [{name: c, image: x, ports: [{containerPort: 80, name: http}, {containerPort: 53, protocol: UDP}]}]}
---
apiVersion: lab.ztrust.io/v1
kind: ExternalHost
metadata: {name: gw}
spec: {ip: 203.0.113.10, ports: [{port: 443}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
"#;

    #[test]
    fn reads_objects_lists_and_lab_objects() {
        let read = parse_text("f.yaml", TEXT).unwrap();
        let names: Vec<String> = read.objects.iter().map(RawObject::display).collect();
        assert_eq!(
            names,
            ["Namespace payments", "Pod default/web", "ExternalHost gw"]
        );
        assert_eq!(read.skipped.len(), 1, "{:?}", read.skipped);
        assert_eq!(read.objects[1].file_name(), "pod-default-web.yaml");
        assert_eq!(read.objects[0].file_name(), "namespace-payments.yaml");
        assert_eq!(read.objects[1].value["metadata"]["namespace"], "default");
    }

    #[test]
    fn pod_model_has_ports_and_filled_ips() {
        let read = parse_text("f.yaml", TEXT).unwrap();
        let mut pod = read.objects[1].clone();
        set_pod_ips(
            &mut pod.value,
            &["10.244.0.10".parse().unwrap(), "fd00:10:244::a".parse().unwrap()],
        );
        let (model, warnings) = pod_model(&pod);
        assert!(warnings.is_empty(), "{warnings:?}");
        let model = model.unwrap();
        assert_eq!(model.ips.len(), 2);
        assert_eq!(model.ports.len(), 2);
        assert_eq!(model.ports[1].protocol, Protocol::Udp);
        let yaml = to_yaml(&pod.value);
        assert!(yaml.contains("podIP: 10.244.0.10"), "{yaml}");
    }

    #[test]
    fn external_host_spec() {
        let read = parse_text("f.yaml", TEXT).unwrap();
        let x = external_host(&read.objects[2]).unwrap();
        assert_eq!(x.ips, vec!["203.0.113.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            x.ports,
            vec![ContainerPort {
                name: None,
                port: 443,
                protocol: Protocol::Tcp
            }]
        );
        // Each mistake names its field, in the agent's vocabulary of problems.
        for (spec, field, problem) in [
            ("{ip: nope}", "spec.ip", Problem::BadIp("nope".into())),
            (
                "{ips: [203.0.113.1, 7]}",
                "spec.ips[1]",
                Problem::BadIp("7".into()),
            ),
            ("{}", "spec.ip", Problem::Missing),
            (
                "{ip: 203.0.113.1, ports: [{port: 70000}]}",
                "spec.ports[0].port",
                Problem::PortRange(70000),
            ),
            (
                "{ip: 203.0.113.1, ports: [{}]}",
                "spec.ports[0].port",
                Problem::Missing,
            ),
            (
                "{ip: 203.0.113.1, ports: [{port: 1, protocol: ICMP}]}",
                "spec.ports[0].protocol",
                Problem::Protocol("ICMP".into()),
            ),
        ] {
            let text = format!(
                "apiVersion: lab.ztrust.io/v1\nkind: ExternalHost\nmetadata: {{name: b}}\nspec: {spec}\n"
            );
            let bad = parse_text("f.yaml", &text).unwrap();
            match external_host(&bad.objects[0]) {
                Err(Error::Object(e)) => {
                    assert_eq!((e.field.as_str(), &e.problem), (field, &problem), "{spec}");
                }
                other => panic!("{spec}: {other:?}"),
            }
        }
        let no_spec = parse_text(
            "f.yaml",
            "apiVersion: lab.ztrust.io/v1\nkind: ExternalHost\nmetadata: {name: b}\n",
        )
        .unwrap();
        assert!(matches!(external_host(&no_spec.objects[0]), Err(Error::Object(e)) if e.field == "spec"));
    }

    #[test]
    fn a_file_that_is_no_yaml_is_refused_whole() {
        match parse_text("f.yaml", "kind: [unclosed\n") {
            Err(Error::Manifest {
                file,
                problem: Problem::Syntax(_),
            }) => assert_eq!(file, "f.yaml"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn labels_set_and_removed() {
        let mut v = json!({"metadata": {"name": "x"}});
        set_label(&mut v, "app", Some("web"));
        assert_eq!(v["metadata"]["labels"]["app"], "web");
        set_label(&mut v, "app", None);
        assert_eq!(v["metadata"]["labels"], json!({}));
    }
}
