"""Schema validation of deploy/ against the Kubernetes 1.33 OpenAPI schemas, offline.

kubernetes-validate bundles the JSON schemas of every Kubernetes release, so nothing is downloaded;
`strict` rejects properties a schema does not define (a typo, a field of another version).
The manifests are rendered with `kubectl kustomize` when kubectl is there (what `kubectl apply -k`
sends), else read from the files deploy/base/kustomization.yaml lists.

    python3 -m venv /tmp/kv && /tmp/kv/bin/pip install -r tests/deploy/requirements.txt
    /tmp/kv/bin/python -m unittest discover -s tests/deploy -v

The Rust side (strict decoding into k8s-openapi types, RBAC coverage of the agent's API calls,
DaemonSet invariants) is tests/deploy/manifests.rs: `cargo test -p ztrust-agent --test deploy_manifests`.
"""

import copy
import pathlib
import shutil
import subprocess
import unittest

import yaml

try:
    import kubernetes_validate
except ImportError:  # pragma: no cover
    kubernetes_validate = None

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# The API the workspace is built against (k8s-openapi feature v1_33).
K8S_VERSION = "1.33.0"


def rendered():
    """The objects `kubectl apply -k deploy/` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(DEPLOY)], check=True, capture_output=True, text=True)
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    base = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    docs = []
    for r in base["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "base" / r).read_text()) if d]
    return docs


def validate(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@unittest.skipIf(kubernetes_validate is None, "pip install -r tests/deploy/requirements.txt")
class Manifests(unittest.TestCase):
    def test_every_object_matches_the_schema(self):
        docs = rendered()
        kinds = sorted(d["kind"] for d in docs)
        self.assertEqual(
            kinds, ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "Namespace", "Service", "ServiceAccount"]
        )
        for d in docs:
            with self.subTest(kind=d["kind"], name=d["metadata"]["name"]):
                validate(d)

    def test_everything_lands_in_ztrust_system(self):
        for d in rendered():
            if d["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                continue
            self.assertEqual(d["metadata"].get("namespace"), "ztrust-system", d["kind"])

    def test_strict_validation_rejects_a_typo(self):
        ds = next(d for d in rendered() if d["kind"] == "DaemonSet")
        bad = copy.deepcopy(ds)
        bad["spec"]["template"]["spec"]["hostNetwrok"] = True
        with self.assertRaises(kubernetes_validate.ValidationError):
            validate(bad)
        bad = copy.deepcopy(ds)
        bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = "BPF"
        with self.assertRaises(kubernetes_validate.ValidationError):
            validate(bad)

    def test_service_monitor_component(self):
        # A CRD: no schema in kubernetes-validate; its shape is checked by manifests.rs.
        sm = yaml.safe_load((DEPLOY / "base" / "servicemonitor" / "servicemonitor.yaml").read_text())
        self.assertEqual((sm["apiVersion"], sm["kind"]), ("monitoring.coreos.com/v1", "ServiceMonitor"))
        comp = yaml.safe_load((DEPLOY / "base" / "servicemonitor" / "kustomization.yaml").read_text())
        self.assertEqual(comp["kind"], "Component")
        self.assertIn("servicemonitor.yaml", comp["resources"])


if __name__ == "__main__":
    unittest.main()
