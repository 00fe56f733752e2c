#!/usr/bin/env bash
# End-to-end check of a cluster brought up by `cargo xtask cluster up`: the node is Ready, a busybox
# Deployment runs, `kubectl exec` and `kubectl logs` work, and a pod reaches a Service by its DNS name
# through CoreDNS and kube-proxy. Leaves nothing behind (namespace ztrust-smoke is deleted).
set -euo pipefail
cd "$(dirname "$0")/../.."
# Each command is shown as it runs, as in a terminal.
kubectl() {
  echo "\$ kubectl $*" >&2
  target/cluster/bin/kubectl --kubeconfig=/var/lib/ztrust-cluster/pki/admin.kubeconfig "$@"
}
ns=ztrust-smoke

kubectl version
kubectl get nodes -o wide
kubectl create namespace "$ns"
kubectl -n "$ns" apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: httpd
          image: ztrust.test/workload:1
          command: ["sh", "-c", "echo \"hello from $(hostname)\" > /var/www/index.html && exec httpd -f -v -p 80 -h /var/www"]
          ports:
            - containerPort: 80
          readinessProbe:
            tcpSocket: {port: 80}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
    - port: 80
      targetPort: 80
---
# The same pods behind a dual-stack Service, IPv6 first.
apiVersion: v1
kind: Service
metadata:
  name: web6
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  selector: {app: web}
  ports:
    - port: 80
      targetPort: 80
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: client
spec:
  replicas: 1
  selector:
    matchLabels: {app: client}
  template:
    metadata:
      labels: {app: client}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: client
          image: ztrust.test/workload:1
          command: ["sleep", "infinity"]
YAML
kubectl -n "$ns" rollout status deployment/web --timeout=120s
kubectl -n "$ns" rollout status deployment/client --timeout=120s
kubectl -n "$ns" get pods,svc,endpointslices -o wide
kubectl -n "$ns" exec deploy/client -- cat /etc/resolv.conf
kubectl -n "$ns" exec deploy/client -- nslookup web.$ns.svc.cluster.local
for _ in 1 2 3; do
  kubectl -n "$ns" exec deploy/client -- wget -qO- "http://web.$ns.svc.cluster.local"
done
kubectl -n "$ns" exec deploy/client -- wget -qO- "http://web"
kubectl -n "$ns" exec deploy/client -- ip -6 addr show dev eth0
kubectl -n "$ns" exec deploy/client -- nslookup -type=AAAA web6.$ns.svc.cluster.local
ip6=$(kubectl -n "$ns" get service web6 -o jsonpath='{.spec.clusterIPs[0]}')
kubectl -n "$ns" exec deploy/client -- wget -qO- "http://[$ip6]"
kubectl -n "$ns" logs deploy/web --tail=5
kubectl delete namespace "$ns" --wait=true --timeout=120s
echo "smoke: all checks passed"
