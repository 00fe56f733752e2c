//! The gRPC service `ztrust.observer.v1.Observer` over a unix socket (always) and TCP with mutual TLS
//! (optional).
//!
//! Each `GetFlows` stream is a stream over a hub subscription, polled by tonic on the connection's
//! task (no task or channel of its own per stream). When the client reads slowly, HTTP/2 flow control
//! stops the polling, the subscription's bounded queue overflows, and the hub counts the loss for this
//! client only (reported as `LostEvents { SLOW_CLIENT }`). Malformed bytes or half-open connections stay inside their own
//! h2 connection task; HTTP/2 keepalive pings reap peers that stopped answering.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::observer::convert;
use crate::observer::filters::FlowFilters;
use crate::observer::hub::{Hub, Item, Observed, Subscription};
use crate::observer::proto::observer_server::{Observer, ObserverServer};
use crate::observer::proto::{
    GetAlertsRequest, GetAlertsResponse, GetFlowsRequest, GetFlowsResponse, LostEventSource, LostEvents,
    PodNotEnforced, ServerStatusRequest, ServerStatusResponse, get_alerts_response, get_flows_response,
};

/// Where the `flows` command finds the agent.
pub const DEFAULT_SOCKET: &str = "/var/run/ztrust/agent.sock";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("preparing the socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// PEM files of the TCP listener: its certificate chain and key, and the CA that client certificates
/// must chain to (clients without a certificate are refused).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The unix socket (`--grpc-socket`).
    pub socket: Option<PathBuf>,
    /// TCP listener (`--grpc-tcp`), only with mTLS.
    pub tcp: Option<(SocketAddr, TlsFiles)>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            socket: Some(DEFAULT_SOCKET.into()),
            tcp: None,
        }
    }
}

/// Queue between a stream's task and tonic. Small: the per-client hub queue is the real buffer.
const RESPONSE_QUEUE: usize = 64;

#[derive(Clone)]
pub struct ObserverService {
    hub: Arc<Hub>,
    /// Where `Explain` is answered (the agent's loop); `None`: it is not served.
    explainer: Option<crate::explain::Explainer>,
}

impl ObserverService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub, explainer: None }
    }

    /// Serves `Explain` by asking `explainer`.
    pub fn with_explainer(mut self, explainer: crate::explain::Explainer) -> Self {
        self.explainer = Some(explainer);
        self
    }

    /// The connection of the kept flow `id`: from its source to its destination's port.
    fn flow_query(&self, id: u64) -> Result<crate::explain::Query, Status> {
        use crate::explain::{Query, Target};
        let kept = self.hub.flows.subscribe(false).kept;
        let o = kept.iter().find(|o| o.seq == id).ok_or_else(|| {
            Status::not_found(format!(
                "flow {id} is not in the agent's flow ring (it keeps the last {} flows; `flows` lists them with \
                 their ids)",
                self.hub.status().max_flows
            ))
        })?;
        let f = &o.flow;
        let protocol = crate::model::Protocol::from_number(f.protocol.0).ok_or_else(|| {
            Status::invalid_argument(format!(
                "flow {id} is {}: explain judges connections of TCP, UDP and SCTP, the protocols of NetworkPolicy ports",
                f.protocol
            ))
        })?;
        let port = f
            .destination
            .port
            .filter(|p| *p != 0)
            .ok_or_else(|| Status::invalid_argument(format!("flow {id} has no destination port")))?;
        Ok(Query {
            from: Target::Address(f.source.ip),
            to: Target::Address(f.destination.ip),
            port,
            protocol,
        })
    }

    pub fn into_server(self) -> ObserverServer<Self> {
        ObserverServer::new(self)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn lost(source: LostEventSource, n: u64) -> get_flows_response::ResponseTypes {
    get_flows_response::ResponseTypes::LostEvents(LostEvents {
        source: source as i32,
        num_events_lost: n,
    })
}

/// Which kept flows a request wants, and how many it asked for that the ring no longer holds.
fn select_kept(
    req: &GetFlowsRequest,
    filters: &FlowFilters,
    kept: &[Arc<Observed>],
    overwritten: u64,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
) -> (Vec<Arc<Observed>>, u64) {
    let history = req.number > 0 || since.is_some() || !req.follow;
    if !history {
        return (Vec::new(), 0);
    }
    let in_window = |o: &Observed| since.is_none_or(|s| o.time >= s) && until.is_none_or(|u| o.time < u);
    let mut out: Vec<Arc<Observed>> = kept
        .iter()
        .filter(|o| in_window(o) && filters.matches(&o.flow))
        .cloned()
        .collect();
    let mut lost_in_ring = 0;
    if req.number > 0 {
        let n = usize::try_from(req.number).unwrap_or(usize::MAX);
        if out.len() > n {
            out.drain(..out.len() - n);
        } else if overwritten > 0 {
            // Fewer than asked for, and flows were overwritten: some of them may have matched.
            // Whether they did cannot be known any more; report how many the ring dropped, at most
            // the shortfall.
            lost_in_ring = overwritten.min(req.number - out.len() as u64);
        }
    } else if overwritten > 0 {
        // Everything (since `since`) was asked for: the ring lost flows if the oldest kept one is
        // already inside the window.
        let oldest = kept.first().map(|o| o.time);
        if since.is_none() || oldest.zip(since).is_some_and(|(o, s)| o >= s) {
            lost_in_ring = overwritten;
        }
    }
    (out, lost_in_ring)
}

/// One `GetFlows` stream: the kept flows it asked for, then (with `follow`) the new ones.
struct FlowStream {
    node: String,
    filters: FlowFilters,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
    lost_in_ring: u64,
    text: convert::Text,
    kept: std::vec::IntoIter<Arc<Observed>>,
    subscription: Option<Subscription<Observed>>,
}

impl FlowStream {
    fn response(&self, r: get_flows_response::ResponseTypes) -> GetFlowsResponse {
        GetFlowsResponse {
            response_types: Some(r),
            node_name: self.node.clone(),
            time: Some(convert::timestamp(SystemTime::now())),
        }
    }

    fn flow(&self, o: &Observed) -> GetFlowsResponse {
        self.response(get_flows_response::ResponseTypes::Flow(
            convert::observed_to_proto(o, self.text),
        ))
    }

    /// The next message; `None` at the end of the history without `follow`, at `until`, or when the
    /// hub is gone.
    async fn next(&mut self) -> Option<GetFlowsResponse> {
        if self.lost_in_ring > 0 {
            let n = std::mem::take(&mut self.lost_in_ring);
            return Some(self.response(lost(LostEventSource::AgentRing, n)));
        }
        if let Some(o) = self.kept.next() {
            return Some(self.flow(&o));
        }
        loop {
            match self.subscription.as_mut()?.next().await? {
                Item::Lost(source, n) => return Some(self.response(lost(source, n))),
                Item::Value(o) => {
                    if self.until.is_some_and(|u| o.time >= u) {
                        return None;
                    }
                    if self.since.is_none_or(|s| o.time >= s) && self.filters.matches(&o.flow) {
                        return Some(self.flow(&o));
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Observer for ObserverService {
    type GetFlowsStream = BoxStream<GetFlowsResponse>;
    type GetAlertsStream = BoxStream<GetAlertsResponse>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let req = request.into_inner();
        let filters = FlowFilters::new(&req.whitelist, &req.blacklist)
            .map_err(|e| Status::invalid_argument(format!("filter: {e}")))?;
        let since = req.since.as_ref().map(convert::system_time);
        let until = req.until.as_ref().map(convert::system_time);
        let follow = req.follow && until.is_none_or(|u| u > SystemTime::now());
        let snapshot = self.hub.flows.subscribe(follow);
        let (kept, lost_in_ring) =
            select_kept(&req, &filters, &snapshot.kept, snapshot.overwritten, since, until);
        // The history, then the followed flows. The stream is polled by the connection's task, so the
        // conversion to protobuf happens there, not on the task that reads the kernel; when the client
        // reads slowly, HTTP/2 flow control stops the polling and this client's hub queue overflows.
        let stream = FlowStream {
            node: self.hub.node.clone(),
            filters,
            since,
            until,
            lost_in_ring,
            text: if req.typed_only {
                convert::Text::Omitted
            } else {
                convert::Text::Also
            },
            kept: kept.into_iter(),
            subscription: snapshot.subscription,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            stream,
            |mut st| async move {
                let msg = st.next().await?;
                Some((Ok(msg), st))
            },
        ))))
    }

    async fn get_alerts(
        &self,
        request: Request<GetAlertsRequest>,
    ) -> Result<Response<Self::GetAlertsStream>, Status> {
        let req = request.into_inner();
        let snapshot = self.hub.alerts.subscribe(req.follow);
        let n = usize::try_from(req.number).unwrap_or(usize::MAX);
        let skip = if req.number == 0 {
            0
        } else {
            snapshot.kept.len().saturating_sub(n)
        };
        let kept: Vec<_> = snapshot.kept[skip..].to_vec();
        let mut subscription = snapshot.subscription;
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        tokio::spawn(async move {
            let alert = |a: &crate::observer::proto::Alert| {
                Ok(GetAlertsResponse {
                    response_types: Some(get_alerts_response::ResponseTypes::Alert(a.clone())),
                })
            };
            for a in &kept {
                if tx.send(alert(a)).await.is_err() {
                    return;
                }
            }
            let Some(sub) = subscription.as_mut() else { return };
            loop {
                let item = tokio::select! {
                    item = sub.next() => item,
                    () = tx.closed() => return,
                };
                let msg = match item {
                    None => return,
                    Some(Item::Value(a)) => alert(&a),
                    Some(Item::Lost(source, n)) => Ok(GetAlertsResponse {
                        response_types: Some(get_alerts_response::ResponseTypes::LostEvents(LostEvents {
                            source: source as i32,
                            num_events_lost: n,
                        })),
                    }),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn explain(
        &self,
        request: Request<crate::observer::proto::ExplainRequest>,
    ) -> Result<Response<crate::observer::proto::ExplainResponse>, Status> {
        use crate::explain::{ExplainCall, ExplainError};
        use crate::observer::explain::{explanation_to_proto, query_from_proto};
        let req = request.into_inner();
        let query = if req.flow_id != 0 {
            self.flow_query(req.flow_id)?
        } else {
            query_from_proto(&req).map_err(|e| Status::invalid_argument(e.to_string()))?
        };
        let explainer = self.explainer.as_ref().ok_or_else(|| {
            Status::unimplemented("this server does not explain (it runs without an agent)")
        })?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || Status::unavailable("the agent is shutting down");
        explainer
            .send(ExplainCall { query, reply })
            .await
            .map_err(|_| gone())?;
        match answer.await.map_err(|_| gone())? {
            Ok(x) => Ok(Response::new(explanation_to_proto(&x))),
            Err(e @ ExplainError::UnknownPod(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ ExplainError::NoCommonFamily { .. }) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ (ExplainError::NoAddress(_) | ExplainError::NotReady)) => {
                Err(Status::failed_precondition(e.to_string()))
            }
        }
    }

    async fn server_status(
        &self,
        _: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let st = self.hub.status();
        Ok(Response::new(ServerStatusResponse {
            node_name: self.hub.node.clone(),
            seen_flows: st.seen_flows,
            num_flows: st.num_flows,
            max_flows: st.max_flows,
            uptime_ns: st.uptime_ns,
            endpoints_enforced: st.endpoints_enforced,
            lost_kernel_ring_buffer: st.lost_kernel_ring_buffer,
            ring_overwritten: st.ring_overwritten,
            lost_slow_clients: st.lost_slow_clients,
            subscribers: st.subscribers,
            alerts_raised: st.alerts_raised,
            version: env!("CARGO_PKG_VERSION").into(),
            otlp_endpoint: self.hub.otlp_endpoint().unwrap_or_default().to_owned(),
            otlp_exported: st.otlp.map_or(0, |o| o.exported),
            otlp_lost_queue_full: st.otlp.map_or(0, |o| o.lost_queue_full),
            otlp_lost_export_failed: st.otlp.map_or(0, |o| o.lost_export_failed),
            pods_not_enforced: self
                .hub
                .not_enforced()
                .into_iter()
                .map(|(pod, reason)| PodNotEnforced { pod, reason })
                .collect(),
        }))
    }
}

fn server() -> Server {
    Server::builder()
        // A peer that stops answering pings within the timeout is disconnected.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .concurrency_limit_per_connection(64)
}

/// Binds the unix socket: parent directory created (0755), a stale socket file replaced, the socket
/// made 0600 (only root talks to the agent: flows name pods and policies).
pub fn bind_unix(path: &Path) -> Result<UnixListener> {
    let err = |source| Error::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        // A socket someone answers on belongs to a running agent: never steal it.
        Ok(m) if m.file_type().is_socket() && std::os::unix::net::UnixStream::connect(path).is_ok() => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent is serving on this socket",
            )));
        }
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; not replacing it",
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve_unix(
    service: ObserverService,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let socket = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    info!(socket = %socket.as_deref().unwrap_or(Path::new("?")).display(), "flow API listening");
    server()
        .add_service(service.clone().into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

pub fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|source| Error::Read {
            path: p.clone(),
            source,
        })
    };
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?))
        .client_ca_root(Certificate::from_pem(read(&files.client_ca)?))
        .client_auth_optional(false))
}

/// Serves the API on TCP with mutual TLS until `shutdown` resolves.
pub async fn serve_tcp(
    service: ObserverService,
    listener: tokio::net::TcpListener,
    tls: &TlsFiles,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    info!(addr = ?listener.local_addr().ok(), "flow API listening on TCP (mTLS)");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    server()
        .tls_config(tls_config(tls)?)?
        .add_service(service.clone().into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    debug!("TCP flow API stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observer::hub::HubOptions;

    fn observed(seq: u64, secs: u64) -> Arc<Observed> {
        Arc::new(Observed {
            seq,
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            flow: crate::flows::testing::denied(),
        })
    }

    #[test]
    fn selecting_kept_flows() {
        let kept: Vec<_> = (1..=5).map(|i| observed(i, 100 + i)).collect();
        let f = FlowFilters::default();
        let req = |number, follow| GetFlowsRequest {
            number,
            follow,
            ..Default::default()
        };
        let seqs = |v: Vec<Arc<Observed>>| v.iter().map(|o| o.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(select_kept(&req(2, false), &f, &kept, 0, None, None).0),
            [4, 5]
        );
        assert_eq!(
            seqs(select_kept(&req(0, false), &f, &kept, 0, None, None).0),
            [1, 2, 3, 4, 5]
        );
        assert!(
            select_kept(&req(0, true), &f, &kept, 0, None, None).0.is_empty(),
            "follow alone: only new flows"
        );
        let since = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(103));
        let until = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(105));
        assert_eq!(
            seqs(select_kept(&req(0, false), &f, &kept, 0, since, until).0),
            [3, 4]
        );
        // Asked for 10, 5 kept, 7 overwritten: at most 5 of those were wanted.
        assert_eq!(select_kept(&req(10, false), &f, &kept, 7, None, None).1, 5);
        assert_eq!(select_kept(&req(3, false), &f, &kept, 7, None, None).1, 0);
        // `since` older than the oldest kept flow, and some overwritten: reported.
        let early = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(50));
        assert_eq!(select_kept(&req(0, false), &f, &kept, 7, early, None).1, 7);
        assert_eq!(select_kept(&req(0, false), &f, &kept, 7, since, None).1, 0);
    }

    #[test]
    fn stale_socket_is_replaced_and_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            drop(bind_unix(&path).unwrap());
            // The file stays behind after the listener is gone: a stale socket.
            assert!(path.exists());
            let _l = bind_unix(&path).unwrap();
            assert!(bind_unix(&path).is_err(), "a live socket is not replaced");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        });
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "x").unwrap();
        rt.block_on(async { assert!(bind_unix(&file).is_err()) });
        let _ = Hub::new(HubOptions::default());
    }
}
