//! A fake Kubernetes API server for the Kubernetes source's tests: plain HTTP/1.1 on 127.0.0.1, the
//! real list/watch protocol for Namespaces, Pods, NetworkPolicies, Services and EndpointSlices (all
//! namespaces), and Event
//! creation. Unprivileged.
//!
//! What it speaks, as the real API server does
//! (<https://kubernetes.io/docs/reference/using-api/api-concepts/#efficient-detection-of-changes>):
//! - `GET /api/v1/namespaces`, `/api/v1/pods`, `/apis/networking.k8s.io/v1/networkpolicies`,
//!   `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`: a `*List`
//!   with `metadata.resourceVersion` (the global one); `limit`/`continue` are ignored (one page).
//! - the same with `?watch=true&resourceVersion=N[&allowWatchBookmarks=true][&timeoutSeconds=T]`: a
//!   chunked stream of JSON lines `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":{...}}` with every
//!   change after N (from the history), then live ones; ends cleanly after T seconds.
//! - a watch from an N older than the history ([`FakeApiServer::expire_history_with`]) gets, as the real
//!   server does, `200` and one `{"type":"ERROR","object":{"kind":"Status",...,"code":410}}` line.
//! - `POST /apis/events.k8s.io/v1/namespaces/{ns}/events`: stored, `201`.
//! - `GET /apis/networking.k8s.io/v1`: discovery, as a server before Kubernetes 1.33 (no
//!   `servicecidrs`; the real cluster tier has them).
//!
//! With [`FakeApiServer::start_tls`] it speaks HTTPS and requires a bearer token, as the real API server
//! does for a service account.
//!
//! Failures on demand: [`FakeApiServer::drop_watches`] aborts every watch connection mid-stream (no
//! terminating chunk, as when a load balancer or the server dies); [`FakeApiServer::stop`] closes the
//! listener and every connection, [`FakeApiServer::restart`] listens again on the same port.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
    EndpointSlice,
}

impl Kind {
    fn of(value: &Value) -> Kind {
        match value["kind"].as_str() {
            Some("Namespace") => Kind::Namespace,
            Some("Pod") => Kind::Pod,
            Some("NetworkPolicy") => Kind::NetworkPolicy,
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            other => panic!("fake API server: unsupported kind {other:?}"),
        }
    }

    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/namespaces" => Some(Kind::Namespace),
            "/api/v1/pods" => Some(Kind::Pod),
            "/apis/networking.k8s.io/v1/networkpolicies" => Some(Kind::NetworkPolicy),
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

type Key = (Kind, String, String);

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    kind: Kind,
    type_: &'static str,
    object: Value,
}

/// Counters of what clients asked, for assertions.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub lists: BTreeMap<Kind, u64>,
    pub watches: BTreeMap<Kind, u64>,
    /// Watches answered with an ERROR event of code 410.
    pub gone: u64,
    /// Watch connections aborted by `drop_watches`.
    pub dropped: u64,
}

struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Changes since the last compaction, oldest first.
    history: Vec<WatchEvent>,
    /// A watch from a resourceVersion below this one is `410 Gone`.
    oldest: u64,
    events: Vec<Value>,
    stats: Stats,
    /// Kinds whose list and watch requests fail with this status code.
    failing: BTreeMap<Kind, u16>,
}

struct Shared {
    state: Mutex<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Requests without `Authorization: Bearer <token>` are `401 Unauthorized`.
    token: Option<String>,
    live: broadcast::Sender<WatchEvent>,
    /// Bumped to abort every watch connection.
    drop_gen: watch::Sender<u64>,
    /// Bumped to end every watch cleanly (as its `timeoutSeconds` does).
    close_gen: watch::Sender<u64>,
}

/// One change for [`FakeApiServer::expire_history_with`].
pub enum Change {
    Apply(Value),
    Delete(&'static str, String, String),
}

pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    serving: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(t) = self.serving.lock().unwrap().take() {
            t.abort();
        }
    }
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        Self::start_with(None, None).await
    }

    /// HTTPS with this certificate chain and key (PEM), and a bearer token required.
    pub async fn start_tls(cert_pem: &str, key_pem: &str, token: &str) -> FakeApiServer {
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Self::start_with(Some(acceptor), Some(token.to_owned())).await
    }

    /// Plain HTTP on a listener bound by the caller (in another network namespace, say: a socket stays in
    /// the namespace it was made in). Needs a Tokio runtime.
    pub fn start_on(listener: std::net::TcpListener) -> FakeApiServer {
        Self::serve_on(None, None, tokio_listener(listener))
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>, token: Option<String>) -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        Self::serve_on(tls, token, listener)
    }

    fn serve_on(
        tls: Option<tokio_rustls::TlsAcceptor>,
        token: Option<String>,
        listener: TcpListener,
    ) -> FakeApiServer {
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            tls,
            token,
            state: Mutex::new(State {
                rv: 1,
                objects: BTreeMap::new(),
                history: Vec::new(),
                oldest: 1,
                events: Vec::new(),
                stats: Stats::default(),
                failing: BTreeMap::new(),
            }),
            live: broadcast::channel(4096).0,
            drop_gen: watch::channel(0).0,
            close_gen: watch::channel(0).0,
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        FakeApiServer {
            shared,
            addr,
            serving: Mutex::new(Some(task)),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Creates or replaces an object (by kind, namespace, name); returns its new resourceVersion.
    pub fn apply(&self, object: Value) -> u64 {
        let mut st = self.shared.state.lock().unwrap();
        let ev = st.apply(object);
        let rv = ev.rv;
        let _ = self.shared.live.send(ev);
        rv
    }

    /// Deletes an object; false if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let mut st = self.shared.state.lock().unwrap();
        match st.delete(kind, namespace, name) {
            Some(ev) => {
                let _ = self.shared.live.send(ev);
                true
            }
            None => false,
        }
    }

    /// Aborts every open watch connection (clients re-watch from their last resourceVersion).
    pub fn drop_watches(&self) {
        self.shared.drop_gen.send_modify(|g| *g += 1);
    }

    /// Ends every open watch cleanly, as the server does when a watch's `timeoutSeconds` is up
    /// (clients re-watch from their last resourceVersion at once).
    pub fn close_watches(&self) {
        self.shared.close_gen.send_modify(|g| *g += 1);
    }

    /// Ends every watch (cleanly), makes `changes` without any watch event, and forgets the history:
    /// clients can only catch up by listing again, after a `410 Gone` on their next watch (as after an
    /// etcd compaction while their watch was being renewed).
    pub fn expire_history_with(&self, changes: Vec<Change>) {
        let mut st = self.shared.state.lock().unwrap();
        self.close_watches();
        for c in changes {
            match c {
                Change::Apply(v) => {
                    st.apply(v);
                }
                Change::Delete(kind, ns, name) => {
                    st.delete(kind, &ns, &name);
                }
            }
        }
        st.history.clear();
        st.rv += 1;
        st.oldest = st.rv;
    }

    /// Stops listening and closes every connection (the API server is down).
    pub async fn stop(&self) {
        let task = self.serving.lock().unwrap().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same address.
    pub async fn restart(&self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).expect("re-bind the same port");
        let listener = socket.listen(128).unwrap();
        let task = tokio::spawn(serve(listener, self.shared.clone()));
        *self.serving.lock().unwrap() = Some(task);
    }

    /// Listens again on a listener bound by the caller (see [`FakeApiServer::start_on`]).
    pub fn restart_on(&self, listener: std::net::TcpListener) {
        let task = tokio::spawn(serve(tokio_listener(listener), self.shared.clone()));
        *self.serving.lock().unwrap() = Some(task);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes list and watch requests of `kind` fail with `code` (e.g. 403 without RBAC, 503), or
    /// succeed again with `None`.
    pub fn fail_kind(&self, kind: Kind, code: Option<u16>) {
        let mut st = self.shared.state.lock().unwrap();
        match code {
            Some(c) => st.failing.insert(kind, c),
            None => st.failing.remove(&kind),
        };
    }

    pub fn stats(&self) -> Stats {
        self.shared.state.lock().unwrap().stats.clone()
    }

    /// Events posted so far (events.k8s.io/v1 Event objects).
    pub fn events(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().events.clone()
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.state.lock().unwrap().rv
    }
}

fn tokio_listener(listener: std::net::TcpListener) -> TcpListener {
    listener.set_nonblocking(true).expect("non-blocking listener");
    TcpListener::from_std(listener).expect("listener in the Tokio runtime")
}

impl State {
    fn key(kind: Kind, object: &Value) -> Key {
        let meta = &object["metadata"];
        let ns = if kind == Kind::Namespace {
            String::new()
        } else {
            meta["namespace"].as_str().unwrap_or("default").to_owned()
        };
        (kind, ns, meta["name"].as_str().expect("metadata.name").to_owned())
    }

    fn apply(&mut self, mut object: Value) -> WatchEvent {
        let kind = Kind::of(&object);
        let key = Self::key(kind, &object);
        self.rv += 1;
        let meta = object["metadata"].as_object_mut().expect("metadata");
        if kind != Kind::Namespace {
            meta.insert("namespace".into(), json!(key.1));
        }
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        let uid = match self.objects.get(&key) {
            Some(old) => old["metadata"]["uid"].clone(),
            None => json!(format!("uid-{}", self.rv)),
        };
        meta.insert("uid".into(), uid);
        let type_ = if self.objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let ev = WatchEvent {
            rv: self.rv,
            kind,
            type_,
            object,
        };
        self.history.push(ev.clone());
        ev
    }

    fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> Option<WatchEvent> {
        let kind = Kind::of(&json!({ "kind": kind }));
        let ns = if kind == Kind::Namespace {
            String::new()
        } else {
            namespace.to_owned()
        };
        let mut object = self.objects.remove(&(kind, ns, name.to_owned()))?;
        self.rv += 1;
        // The DELETED event carries the object at the resourceVersion of its deletion.
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let ev = WatchEvent {
            rv: self.rv,
            kind,
            type_: "DELETED",
            object,
        };
        self.history.push(ev.clone());
        Some(ev)
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Connections live in this set: aborting `serve` drops it and so aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                conns.spawn(async move {
                    match shared.tls.clone() {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                serve_io(tls, shared).await;
                            }
                        }
                        None => serve_io(stream, shared).await,
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_io<I>(io: I, shared: Arc<Shared>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await;
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|e: Infallible| match e {})
                .boxed(),
        )
        .unwrap()
}

fn status(code: u16, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(token) = &shared.token {
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(format!("Bearer {token}").as_str()) {
            return Ok(full(
                StatusCode::UNAUTHORIZED,
                status(401, "Unauthorized", "Unauthorized".into()),
            ));
        }
    }
    // Discovery of the group, as a server before Kubernetes 1.33 answers it: no ServiceCIDR resource.
    if path == "/apis/networking.k8s.io/v1" && req.method() == Method::GET {
        return Ok(full(
            StatusCode::OK,
            json!({
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "networking.k8s.io/v1",
                "resources": [{
                    "name": "networkpolicies", "singularName": "networkpolicy", "namespaced": true,
                    "kind": "NetworkPolicy", "verbs": ["get", "list", "watch"],
                }],
            }),
        ));
    }
    if let Some(kind) = Kind::from_path(&path)
        && req.method() == Method::GET
    {
        let q = query(&req);
        if let Some(code) = shared.state.lock().unwrap().failing.get(&kind).copied() {
            let status_code = StatusCode::from_u16(code).unwrap();
            let reason = status_code
                .canonical_reason()
                .unwrap_or("Failure")
                .replace(' ', "");
            return Ok(full(
                status_code,
                status(code, &reason, format!("{} failing on purpose", kind.name())),
            ));
        }
        if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
            return Ok(watch_response(&shared, kind, &q));
        }
        let mut st = shared.state.lock().unwrap();
        *st.stats.lists.entry(kind).or_default() += 1;
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect();
        return Ok(full(
            StatusCode::OK,
            json!({
                "apiVersion": kind.api_version(),
                "kind": format!("{}List", kind.name()),
                "metadata": { "resourceVersion": st.rv.to_string() },
                "items": items,
            }),
        ));
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if req.method() == Method::POST
        && let ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"] = parts.as_slice()
    {
        let ns = (*ns).to_owned();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return Ok(full(
                    StatusCode::BAD_REQUEST,
                    status(400, "BadRequest", e.to_string()),
                ));
            }
        };
        let Ok(mut event) = serde_json::from_slice::<Value>(&body) else {
            return Ok(full(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", "not JSON".into()),
            ));
        };
        let mut st = shared.state.lock().unwrap();
        st.rv += 1;
        event["metadata"]["namespace"] = json!(ns);
        event["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.events.push(event.clone());
        return Ok(full(StatusCode::CREATED, event));
    }
    Ok(full(
        StatusCode::NOT_FOUND,
        status(
            404,
            "NotFound",
            format!("{} {path}: not served by the fake", req.method()),
        ),
    ))
}

struct WatchStream {
    kind: Kind,
    pending: VecDeque<Bytes>,
    live: broadcast::Receiver<WatchEvent>,
    drop_rx: watch::Receiver<u64>,
    close_rx: watch::Receiver<u64>,
    last_rv: u64,
    bookmarks: bool,
    deadline: tokio::time::Instant,
    ticker: tokio::time::Interval,
    shared: Arc<Shared>,
    done: bool,
}

fn line(type_: &str, object: &Value) -> Bytes {
    let mut s = json!({ "type": type_, "object": object }).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch_response(shared: &Arc<Shared>, kind: Kind, q: &BTreeMap<String, String>) -> Response<Body> {
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1800u64);
    let mut st = shared.state.lock().unwrap();
    *st.stats.watches.entry(kind).or_default() += 1;
    // Subscribed under the lock: no change falls between the history and the live events.
    let live = shared.live.subscribe();
    let mut drop_rx = shared.drop_gen.subscribe();
    drop_rx.mark_unchanged();
    let mut close_rx = shared.close_gen.subscribe();
    close_rx.mark_unchanged();
    let mut pending = VecDeque::new();
    let mut done = false;
    let mut last_rv = from;
    if from != 0 && from < st.oldest {
        st.stats.gone += 1;
        let msg = format!("too old resource version: {from} ({})", st.oldest);
        pending.push_back(line("ERROR", &status(410, "Expired", msg)));
        done = true;
    } else {
        // resourceVersion 0 (or absent) means "any": start from now, as a list would.
        if from == 0 {
            last_rv = st.rv;
        }
        let start = last_rv;
        for ev in st.history.iter().filter(|e| e.kind == kind && e.rv > start) {
            pending.push_back(line(ev.type_, &ev.object));
            last_rv = ev.rv;
        }
    }
    drop(st);
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = WatchStream {
        kind,
        pending,
        live,
        drop_rx,
        close_rx,
        last_rv,
        bookmarks: q.get("allowWatchBookmarks").is_some_and(|v| v == "true"),
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        ticker,
        shared: shared.clone(),
        done,
    };
    let body = futures::stream::unfold(stream, |mut s| async move {
        loop {
            if let Some(b) = s.pending.pop_front() {
                return Some((Ok(Frame::data(b)), s));
            }
            if s.done {
                return None;
            }
            tokio::select! {
                biased;
                _ = s.drop_rx.changed() => {
                    s.shared.state.lock().unwrap().stats.dropped += 1;
                    s.done = true;
                    // An error in the body makes hyper abort the connection mid-stream.
                    return Some((Err(std::io::Error::other("watch dropped on purpose")), s));
                }
                _ = s.close_rx.changed() => return None,
                ev = s.live.recv() => match ev {
                    Ok(ev) if ev.kind == s.kind && ev.rv > s.last_rv => {
                        s.last_rv = ev.rv;
                        s.pending.push_back(line(ev.type_, &ev.object));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        s.done = true;
                        return Some((Err(std::io::Error::other("watch fell behind")), s));
                    }
                },
                _ = tokio::time::sleep_until(s.deadline) => return None,
                _ = s.ticker.tick(), if s.bookmarks => {
                    let bookmark = json!({
                        "kind": s.kind.name(), "apiVersion": s.kind.api_version(),
                        "metadata": { "resourceVersion": s.last_rv.to_string() },
                    });
                    s.pending.push_back(line("BOOKMARK", &bookmark));
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(body).boxed())
        .unwrap()
}
