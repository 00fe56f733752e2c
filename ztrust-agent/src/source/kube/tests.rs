use super::*;

#[test]
fn every_kind_used_is_listed() {
    for verb in ["list", "watch"] {
        api_call::<Namespace>(verb);
        api_call::<Pod>(verb);
        api_call::<NetworkPolicy>(verb);
        api_call::<Service>(verb);
        api_call::<EndpointSlice>(verb);
        api_call::<ServiceCIDR>(verb);
    }
    api_call::<k8s_openapi::api::events::v1::Event>("create");
    assert_eq!(API_CALLS.len(), 7, "every entry is used by the code above");
}

/// Slimming keeps everything the conversion reads.
#[test]
fn slim_pod_converts_the_same() {
    let full: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "web", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
            "labels": { "app": "web" },
            "annotations": { "ztrust.io/x": "y", LAST_APPLIED: "{...}" },
            "managedFields": [{ "manager": "kubectl", "operation": "Apply" }],
        },
        "spec": {
            "nodeName": "n1", "hostNetwork": false, "serviceAccountName": "web",
            "containers": [{ "name": "app", "image": "nginx", "env": [{ "name": "A", "value": "1" }],
                             "ports": [{ "name": "http", "containerPort": 80 },
                                       { "containerPort": 53, "protocol": "UDP" }] }],
            "initContainers": [{ "name": "init", "image": "busybox",
                                 "ports": [{ "name": "metrics", "containerPort": 9000 }] }],
            "volumes": [{ "name": "v", "emptyDir": {} }],
        },
        "status": {
            "phase": "Running", "podIP": "10.0.0.5", "podIPs": [{ "ip": "10.0.0.5" }, { "ip": "fd00::5" }],
            "hostIP": "192.0.2.1", "conditions": [{ "type": "Ready", "status": "True" }],
        },
    }))
    .unwrap();
    let mut slim = full.clone();
    slim_pod(&mut slim);
    let (a, b) = (convert::convert_pod(&full), convert::convert_pod(&slim));
    assert_eq!(a.errors, b.errors);
    let (mut a, b) = (a.value.unwrap(), b.value.unwrap());
    // Only the last-applied annotation differs: nobody reads it.
    assert_eq!(a.annotations.remove(LAST_APPLIED).as_deref(), Some("{...}"));
    assert_eq!(a, b);
    assert_eq!(b.ports.len(), 3);
    assert_eq!(b.ips.len(), 2);
    assert!(slim.metadata.managed_fields.is_none());
    assert!(serde_json::to_string(&slim).unwrap().len() < serde_json::to_string(&full).unwrap().len());
    assert_eq!(slim.metadata.uid.as_deref(), Some("u1"));
}

#[test]
#[should_panic(expected = "missing from API_CALLS")]
fn unlisted_call_panics() {
    api_call::<k8s_openapi::api::core::v1::Secret>("list");
}
