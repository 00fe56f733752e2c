//! Configuration files and command lines of the components.

use super::*;

pub(super) fn write_configs(p: &Paths, proxy_mode: ProxyMode) -> Result<()> {
    let pki = path_str(&p.pki());
    let cfg = p.config();
    let state = path_str(&p.state);
    let run_dir = path_str(&p.run);

    // containerd: Debian's binary with a configuration and directories of its own (its socket, root and
    // state are not the system containerd's), the cgroupfs driver (no systemd), our pause image, and the
    // pods' network namespaces under its state directory so that `down` finds every one of them.
    fs::write(
        cfg.join("containerd.toml"),
        format!(
            r#"version = 2
root = "{state}/containerd"
state = "{run_dir}/containerd"

[grpc]
  address = "{sock}"

# Not /opt/containerd.
[plugins."io.containerd.internal.v1.opt"]
  path = "{state}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  # No OOM score below containerd's own: lowering one needs CAP_SYS_RESOURCE, which this machine's
  # root may lack (runc then fails every container with "failed to update /proc/self/oom_score_adj").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{state}/cni/net.d"
"#,
            sock = path_str(&p.containerd_sock()),
        ),
    )?;

    // CNI: a veth per pod (ptp), addresses from the node's pod range (host-local), no masquerading:
    // nothing leaves the node.
    fs::write(
        p.state.join("cni/net.d/10-ztrust.conflist"),
        format!(
            r#"{{
  "cniVersion": "1.0.0",
  "name": "ztrust-cluster",
  "plugins": [
    {{
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": {{
        "type": "host-local",
        "dataDir": "{state}/cni/ipam",
        "ranges": [[{{ "subnet": "{POD_CIDR}" }}], [{{ "subnet": "{POD_CIDR6}" }}]],
        "routes": [{{ "dst": "0.0.0.0/0" }}, {{ "dst": "::/0" }}]
      }}
    }},
    {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }}
  ]
}}
"#
        ),
    )?;

    // Pods' resolv.conf for dnsPolicy Default (CoreDNS itself, host-network pods): the cluster's DNS,
    // not the host's resolver, which is off this machine.
    fs::write(cfg.join("resolv.conf"), format!("nameserver {DNS_SERVICE_IP}\n"))?;

    fs::write(
        cfg.join("kubelet.yaml"),
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 only; the kubelet refuses it unless told (KEP-5573).
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
address: {NODE_IP}
healthzBindAddress: 127.0.0.1
# The apiserver's requests (logs, exec, port-forward) carry its client certificate; anything else is
# checked against the apiserver (TokenReview, SubjectAccessReview).
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {pki}/ca.crt
authorization:
  mode: Webhook
tlsCertFile: {pki}/kubelet-serving.crt
tlsPrivateKeyFile: {pki}/kubelet-serving.key
clusterDNS: [{DNS_SERVICE_IP}]
clusterDomain: {CLUSTER_DOMAIN}
resolvConf: {resolv}
podLogsDir: {state}/pod-logs
# The images were imported, not pulled: they cannot come back once collected.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
maxPods: 110
"#,
            sock = path_str(&p.containerd_sock()),
            resolv = path_str(&cfg.join("resolv.conf")),
        ),
    )?;

    fs::write(
        cfg.join("kube-proxy.yaml"),
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {pki}/kube-proxy.kubeconfig
mode: {mode}
clusterCIDR: {CLUSTER_CIDR},{CLUSTER_CIDR6}
hostnameOverride: {NODE_NAME}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Node ports on the node IP only (not on every pod veth's 10.244.0.1).
nodePortAddresses: [primary]
# nf_conntrack_max is the host's, not the node namespace's: leave it.
conntrack:
  maxPerCore: 0
  min: 0
"#,
            mode = proxy_mode.as_str(),
        ),
    )?;

    // The kernel tunables the kubelet checks at start, as it wants them (see the module comment).
    let tunables = p.config().join("tunables");
    fs::create_dir_all(&tunables)?;
    for (name, value) in KUBELET_TUNABLES {
        fs::write(tunables.join(name.replace('/', "_")), format!("{value}\n"))?;
    }
    Ok(())
}

/// /proc/sys paths and the values the kubelet's setupKernelTunables wants
/// (pkg/kubelet/cm/container_manager_linux.go); it rewrites the machine's otherwise.
pub(super) const KUBELET_TUNABLES: &[(&str, u32)] = &[
    ("vm/overcommit_memory", 1),
    ("vm/panic_on_oom", 0),
    ("kernel/panic", 10),
    ("kernel/panic_on_oops", 1),
    ("kernel/keys/root_maxkeys", 1_000_000),
    ("kernel/keys/root_maxbytes", 25_000_000),
];

pub(super) fn etcd_args(p: &Paths) -> Vec<String> {
    vec![
        format!("--data-dir={}", p.state.join("etcd").display()),
        format!("--name={NODE_NAME}"),
    ]
}

pub(super) fn apiserver_args(p: &Paths) -> Vec<String> {
    let pki = path_str(&p.pki());
    [
        "--etcd-servers=http://127.0.0.1:2379".to_owned(),
        format!("--advertise-address={NODE_IP}"),
        "--bind-address=0.0.0.0".into(),
        "--secure-port=6443".into(),
        format!("--tls-cert-file={pki}/apiserver.crt"),
        format!("--tls-private-key-file={pki}/apiserver.key"),
        format!("--client-ca-file={pki}/ca.crt"),
        format!("--kubelet-client-certificate={pki}/apiserver-kubelet-client.crt"),
        format!("--kubelet-client-key={pki}/apiserver-kubelet-client.key"),
        format!("--kubelet-certificate-authority={pki}/ca.crt"),
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!("--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}"),
        format!("--service-account-key-file={pki}/sa.pub"),
        format!("--service-account-signing-key-file={pki}/sa.key"),
        format!("--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}"),
        "--authorization-mode=Node,RBAC".into(),
        // The default plugins are on; NodeRestriction as kubeadm adds it (a kubelet edits only its node).
        "--enable-admission-plugins=NodeRestriction".into(),
        // The agent's DaemonSet is privileged.
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        // The front proxy (aggregated APIs), as kubeadm sets it up; the controller-manager's and the
        // scheduler's delegated authentication also want its CA.
        format!("--requestheader-client-ca-file={pki}/front-proxy-ca.crt"),
        "--requestheader-allowed-names=front-proxy-client".into(),
        "--requestheader-username-headers=X-Remote-User".into(),
        "--requestheader-group-headers=X-Remote-Group".into(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
        format!("--proxy-client-cert-file={pki}/front-proxy-client.crt"),
        format!("--proxy-client-key-file={pki}/front-proxy-client.key"),
    ]
    .into()
}

pub(super) fn controller_manager_args(p: &Paths) -> Vec<String> {
    let pki = path_str(&p.pki());
    let kubeconfig = format!("{pki}/controller-manager.kubeconfig");
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=false".into(),
        // One ServiceAccount per controller, as kubeadm: each controller has only its role's rights.
        "--use-service-account-credentials=true".into(),
        // The legacy token controller signs with the same key the apiserver verifies.
        format!("--service-account-private-key-file={pki}/sa.key"),
        format!("--root-ca-file={pki}/ca.crt"),
        format!("--cluster-signing-cert-file={pki}/ca.crt"),
        format!("--cluster-signing-key-file={pki}/ca.key"),
        // node.spec.podCIDRs = 10.244.0.0/24 and fd00:10:244::/64, the ranges the CNI configuration
        // hands out.
        "--allocate-node-cidrs=true".into(),
        format!("--cluster-cidr={CLUSTER_CIDR},{CLUSTER_CIDR6}"),
        "--node-cidr-mask-size-ipv4=24".into(),
        "--node-cidr-mask-size-ipv6=64".into(),
        format!("--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}"),
    ]
}

pub(super) fn scheduler_args(p: &Paths) -> Vec<String> {
    let kubeconfig = format!("{}/scheduler.kubeconfig", p.pki().display());
    vec![
        format!("--kubeconfig={kubeconfig}"),
        format!("--authentication-kubeconfig={kubeconfig}"),
        format!("--authorization-kubeconfig={kubeconfig}"),
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=false".into(),
    ]
}

pub(super) fn kubelet_args(p: &Paths) -> Vec<String> {
    vec![
        format!("--config={}", p.config().join("kubelet.yaml").display()),
        format!("--kubeconfig={}", p.pki().join("kubelet.kubeconfig").display()),
        format!("--root-dir={}", p.kubelet_dir().display()),
        format!("--node-ip={NODE_IP},{NODE_IP6}"),
        format!("--hostname-override={NODE_NAME}"),
        "--v=1".into(),
    ]
}

pub(super) fn coredns_manifest(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: coredns
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:coredns
subjects:
  - kind: ServiceAccount
    name: coredns
    namespace: kube-system
---
# kubeadm's Corefile without `forward`: the node has no upstream resolver to reach, so names outside
# the cluster get SERVFAIL, but for example.com, the outside namespace's web server.
apiVersion: v1
kind: ConfigMap
metadata:
  name: coredns
  namespace: kube-system
data:
  Corefile: |
    .:53 {{
        errors
        health {{
            lameduck 5s
        }}
        ready
        kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
            ttl 30
        }}
        hosts {{
            {EXT_IP} {EXT_NAME}
            fallthrough
        }}
        prometheus :9153
        cache 30
        reload
        loadbalance
    }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
spec:
  replicas: 1
  selector:
    matchLabels:
      k8s-app: kube-dns
  template:
    metadata:
      labels:
        k8s-app: kube-dns
    spec:
      serviceAccountName: coredns
      priorityClassName: system-cluster-critical
      dnsPolicy: Default
      containers:
        - name: coredns
          image: {image}
          imagePullPolicy: Never
          args: ["-conf", "/etc/coredns/Corefile"]
          ports:
            - {{ name: dns, containerPort: 53, protocol: UDP }}
            - {{ name: dns-tcp, containerPort: 53, protocol: TCP }}
            - {{ name: metrics, containerPort: 9153, protocol: TCP }}
          resources:
            requests: {{ cpu: 50m, memory: 64Mi }}
          volumeMounts:
            - {{ name: config, mountPath: /etc/coredns, readOnly: true }}
          livenessProbe:
            httpGet: {{ path: /health, port: 8080 }}
            initialDelaySeconds: 10
          readinessProbe:
            httpGet: {{ path: /ready, port: 8181 }}
      volumes:
        - name: config
          configMap:
            name: coredns
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels:
    k8s-app: kube-dns
    kubernetes.io/name: CoreDNS
spec:
  selector:
    k8s-app: kube-dns
  clusterIP: {DNS_SERVICE_IP}
  ports:
    - {{ name: dns, port: 53, protocol: UDP }}
    - {{ name: dns-tcp, port: 53, protocol: TCP }}
    - {{ name: metrics, port: 9153, protocol: TCP }}
"#
    )
}
