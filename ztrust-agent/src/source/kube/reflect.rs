//! One reflector per kind: the watch streams that keep the stores current, each object slimmed to what
//! the model reads before it is stored.

use super::*;

pub(super) fn spawn_reflector<K>(
    client: &Client,
    changed: watch::Sender<u64>,
    touched: Arc<Mutex<Touched>>,
    slim: fn(&mut K),
    note: fn(&mut Touched, &K),
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let client = client.clone();
    let span = tracing::info_span!("watch", kind = %K::kind(&()));
    let task = tokio::spawn(tracing::Instrument::instrument(
        async move { run_reflector(&client, writer, changed, touched, slim, note).await },
        span,
    ));
    (reader, task)
}

/// Lists and watches `K` into `writer` until the source is dropped, noting every change in `touched`.
pub(super) async fn run_reflector<K>(
    client: &Client,
    writer: reflector::store::Writer<K>,
    changed: watch::Sender<u64>,
    touched: Arc<Mutex<Touched>>,
    slim: fn(&mut K),
    note: fn(&mut Touched, &K),
) where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let _ = api_call::<K>("list");
    let _ = api_call::<K>("watch");
    let kind = K::kind(&());
    let stream = reflector::reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(slim),
    );
    {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        // A 410 was answered; the re-list it causes is not complete.
        let mut expired = false;
        while let Some(item) = stream.next().await {
            match item {
                // The store changes on these; `Init`/`InitApply` are buffered until `InitDone`.
                Ok(
                    event @ (watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone),
                ) => {
                    if failing {
                        info!(%kind, "watch resumed");
                        failing = false;
                    }
                    if expired && matches!(event, watcher::Event::InitDone) {
                        info!(%kind, "re-listed after 410 Gone; watching from the list's resourceVersion");
                        expired = false;
                    }
                    {
                        let mut t = touched.lock().expect("touched lock");
                        match &event {
                            watcher::Event::Apply(o) | watcher::Event::Delete(o) => note(&mut t, o),
                            _ => t.relisted = true,
                        }
                    }
                    changed.send_modify(|g| *g += 1);
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                // The resourceVersion is no longer served (compacted in etcd, or older than the API
                // server's watch cache, e.g. after it restarted): the watcher re-lists by itself.
                Err(watcher::Error::WatchError(e)) if e.code == 410 => {
                    info!(%kind, error = %e, "watch expired (410 Gone): re-listing; the last state stays in force until the list is complete");
                    expired = true;
                }
                Err(e) => {
                    if failing {
                        debug!(%kind, error = %e, "watch still failing");
                    } else {
                        warn!(%kind, error = %e, "watch failed; retrying with backoff, the last state stays in force");
                    }
                    failing = true;
                }
            }
        }
    }
}

/// The ServiceCIDR reflector, if the API server serves `networking.k8s.io/v1` `servicecidrs`; asked
/// by discovery (retried until it answers). Without the resource the store's writer is dropped, which
/// [`KubeSource::is_ready`] reads as "nothing to wait for".
pub(super) fn spawn_service_cidr_reflector(
    client: &Client,
    changed: watch::Sender<u64>,
    touched: Arc<Mutex<Touched>>,
) -> (Store<ServiceCIDR>, JoinHandle<()>) {
    let (reader, writer) = reflector::store::<ServiceCIDR>();
    let _ = api_call::<ServiceCIDR>("list");
    let client = client.clone();
    let task = tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        let served = loop {
            match client.list_api_group_resources("networking.k8s.io/v1").await {
                Ok(list) => break list.resources.iter().any(|r| r.name == "servicecidrs"),
                Err(e) => {
                    warn!(error = %e, "API discovery of networking.k8s.io/v1 failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        };
        if !served {
            info!(
                "the API server has no ServiceCIDR objects (Kubernetes before 1.33): Service ranges only from --service-cidr"
            );
            drop(writer);
            changed.send_modify(|g| *g += 1);
            return;
        }
        run_reflector(
            &client,
            writer,
            changed,
            touched,
            |s: &mut ServiceCIDR| slim_metadata(&mut s.metadata),
            |_, _| {},
        )
        .await;
    });
    (reader, task)
}

/// Annotation `kubectl apply` fills with the whole object: never read, often the largest field.
pub(super) const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What every kind keeps of its metadata: the store holds every object of the cluster, and
/// `managedFields` alone is often most of an object's size.
pub(super) fn slim_metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = &mut meta.annotations {
        a.remove(LAST_APPLIED);
    }
}

pub(super) fn slim_namespace(ns: &mut Namespace) {
    slim_metadata(&mut ns.metadata);
    ns.spec = None;
    ns.status = None;
}

pub(super) fn slim_policy(np: &mut NetworkPolicy) {
    slim_metadata(&mut np.metadata);
}

/// Keeps what [`convert::convert_pod`] and the phase check read: labels, annotations, addresses, phase,
/// node, host network, container ports. Every pod of the cluster is stored: a full Pod (conditions,
/// container statuses, volumes, env) is ten times this.
pub(super) fn slim_pod(pod: &mut Pod) {
    slim_metadata(&mut pod.metadata);
    let ports_only = |c: &mut Container| Container {
        name: std::mem::take(&mut c.name),
        ports: c.ports.take(),
        ..Container::default()
    };
    if let Some(spec) = pod.spec.take() {
        let mut spec = spec;
        pod.spec = Some(PodSpec {
            node_name: spec.node_name.take(),
            host_network: spec.host_network,
            containers: spec.containers.iter_mut().map(ports_only).collect(),
            init_containers: spec
                .init_containers
                .as_mut()
                .map(|cs| cs.iter_mut().map(ports_only).collect()),
            ..PodSpec::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..PodStatus::default()
        });
    }
}
