//! Sidecar injection, as Istio's injector does it: the pod template of a
//! workload gets an init container running `bosun capture` (NET_ADMIN and
//! NET_RAW only), the `bosun-proxy` container (uid 1337, readiness on
//! :15021/healthz/ready, the projected ServiceAccount token with audience
//! `istio-ca`, the mesh root, its labels from the downward API), Istio's
//! labels and status annotation, and its probes sent through the proxy's
//! health port (`/app-health/<container>/livez|readyz|startupz` on
//! 15020), so they pass under STRICT mutual TLS.
//!
//! One function for `bosun inject -f` and the admission webhook: the CLI
//! rewrites whole objects, the webhook answers with a JSONPatch that
//! yields the same pod.

use serde_json::{Map, Value, json};

/// Where injected proxies find the control service, and what they run.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    pub image: String,
    /// `https://host:port` of the control's xDS and CA.
    pub control_address: String,
    /// The DNS name the control's certificate is checked for.
    pub control_name: String,
    pub trust_domain: String,
    /// Mesh-wide `holdApplicationUntilProxyStarts` (a pod's
    /// `proxy.istio.io/config` annotation overrides it).
    pub hold_application: bool,
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            image: "ghcr.io/bosun-mesh/bosun:0.1.0".into(),
            control_address: "https://bosun-control.istio-system.svc:15012".into(),
            control_name: "bosun-control.istio-system.svc".into(),
            trust_domain: "cluster.local".into(),
            hold_application: false,
        }
    }
}

pub const PROXY_NAME: &str = "bosun-proxy";
pub const INIT_NAME: &str = "bosun-init";
const STATUS: &str = "sidecar.istio.io/status";
const INJECT: &str = "sidecar.istio.io/inject";
/// The proxy's health port: app probes, `/healthz/ready`, metrics.
pub const HEALTH_PORT: u16 = 15020;
pub const READY_PORT: u16 = 15021;

/// Istio's capture annotations and the `bosun capture` flags they become.
const CAPTURE_ANNOTATIONS: [(&str, &str); 6] = [
    (
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        "--include-outbound-ip-ranges",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        "--exclude-outbound-ip-ranges",
    ),
    (
        "traffic.sidecar.istio.io/includeInboundPorts",
        "--include-inbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/excludeInboundPorts",
        "--exclude-inbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "--exclude-outbound-ports",
    ),
    (
        "traffic.sidecar.istio.io/includeOutboundPorts",
        "--include-outbound-ports",
    ),
];

/// Whether an object's namespace wants injection: `istio-injection`
/// label on the Namespace (`enabled`/`disabled`); unknown namespaces are
/// injected (as `istioctl kube-inject` does).
pub type NamespacePolicy<'a> = &'a dyn Fn(&str) -> Option<bool>;

/// Injects every workload in a multi-document YAML stream; other objects
/// pass through. Namespaces in the stream with `istio-injection: disabled`
/// are honoured.
pub fn inject_yaml(input: &str, opts: &InjectOptions) -> Result<String, String> {
    let mut docs: Vec<Value> = Vec::new();
    for (line, doc) in crate::load::split_documents(input) {
        let v: Value =
            serde_saphyr::from_str(doc).map_err(|e| format!("document at line {line}: {e}"))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    let mut labels: std::collections::HashMap<String, Option<bool>> = Default::default();
    for d in &docs {
        if d["kind"] == "Namespace"
            && let Some(name) = d["metadata"]["name"].as_str()
        {
            let l = d["metadata"]["labels"]["istio-injection"].as_str();
            labels.insert(
                name.to_string(),
                match l {
                    Some("enabled") => Some(true),
                    Some("disabled") => Some(false),
                    _ => None,
                },
            );
        }
    }
    let policy = |ns: &str| labels.get(ns).copied().flatten();
    let mut out = String::new();
    for (i, mut d) in docs.into_iter().enumerate() {
        inject_object(&mut d, opts, &policy).map_err(|e| {
            format!(
                "document {} ({} {}): {e}",
                i + 1,
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })?;
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(&d).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// Injects one object if it is a workload; `Ok(false)`: left as it was.
pub fn inject_object(
    obj: &mut Value,
    opts: &InjectOptions,
    namespaces: NamespacePolicy<'_>,
) -> Result<bool, String> {
    let kind = obj["kind"].as_str().unwrap_or("").to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    if namespaces(&ns) == Some(false) {
        return Ok(false);
    }
    let template = match kind.as_str() {
        "Pod" => {
            return inject_pod(obj, &name, opts);
        }
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => obj.pointer_mut("/spec/template"),
        "CronJob" => obj.pointer_mut("/spec/jobTemplate/spec/template"),
        "List" => {
            let mut any = false;
            if let Some(items) = obj["items"].as_array_mut() {
                for it in items {
                    any |= inject_object(it, opts, namespaces)?;
                }
            }
            return Ok(any);
        }
        _ => return Ok(false),
    };
    let Some(template) = template else {
        return Err("no pod template".into());
    };
    inject_pod(template, &name, opts)
}

fn annotation<'a>(pod: &'a Value, key: &str) -> Option<&'a str> {
    pod["metadata"]["annotations"][key].as_str()
}

/// Injects a pod (or pod template): `Ok(false)` when it opts out, runs on
/// the host network, or is injected already.
pub fn inject_pod(pod: &mut Value, workload: &str, opts: &InjectOptions) -> Result<bool, String> {
    let opt_out = |v: Option<&str>| matches!(v, Some("false" | "n" | "no" | "off"));
    if opt_out(annotation(pod, INJECT)) || opt_out(pod["metadata"]["labels"][INJECT].as_str()) {
        return Ok(false);
    }
    if pod["spec"]["hostNetwork"] == true {
        return Ok(false);
    }
    if annotation(pod, STATUS).is_some()
        || containers(&pod["spec"], "containers").any(|c| c["name"] == PROXY_NAME)
    {
        return Ok(false);
    }
    if !pod["spec"]["containers"].is_array() {
        return Err("spec.containers: a pod needs containers".into());
    }
    let hold = match annotation(pod, "proxy.istio.io/config") {
        Some(cfg) => {
            let v: Value = serde_saphyr::from_str(cfg)
                .map_err(|e| format!("metadata.annotations[proxy.istio.io/config]: {e}"))?;
            match v.get("holdApplicationUntilProxyStarts") {
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err("proxy.istio.io/config: holdApplicationUntilProxyStarts must be true or false".into());
                }
                None => opts.hold_application,
            }
        }
        None => opts.hold_application,
    };
    let app_name = pod["metadata"]["labels"]["app.kubernetes.io/name"]
        .as_str()
        .or(pod["metadata"]["labels"]["app"].as_str())
        .unwrap_or(workload)
        .to_string();
    let revision = pod["metadata"]["labels"]["app.kubernetes.io/version"]
        .as_str()
        .or(pod["metadata"]["labels"]["version"].as_str())
        .unwrap_or("latest")
        .to_string();

    let probers = rewrite_probes(
        pod,
        annotation(pod, "sidecar.istio.io/rewriteAppHTTPProbers") != Some("false"),
    )?;
    let init = init_container(pod, opts);
    let proxy = proxy_container(pod, opts, hold, &probers)?;

    let meta = object(pod, "metadata");
    let labels = object_at(meta, "labels");
    labels.insert("security.istio.io/tlsMode".into(), json!("istio"));
    labels
        .entry("service.istio.io/canonical-name")
        .or_insert(json!(app_name));
    labels
        .entry("service.istio.io/canonical-revision")
        .or_insert(json!(revision));
    let first_app = pod["spec"]["containers"][0]["name"].clone();
    let meta = object(pod, "metadata");
    let annotations = object_at(meta, "annotations");
    annotations
        .entry("kubectl.kubernetes.io/default-container")
        .or_insert(first_app);
    annotations
        .entry("prometheus.io/scrape")
        .or_insert(json!("true"));
    annotations
        .entry("prometheus.io/port")
        .or_insert(json!(HEALTH_PORT.to_string()));
    annotations
        .entry("prometheus.io/path")
        .or_insert(json!("/stats/prometheus"));
    annotations.insert(
        STATUS.into(),
        json!(
            json!({
                "initContainers": [INIT_NAME],
                "containers": [PROXY_NAME],
                "volumes": ["istio-token", "istiod-ca-cert", "istio-podinfo"],
                "revision": "default",
            })
            .to_string()
        ),
    );

    let spec = object(pod, "spec");
    let inits = array_at(spec, "initContainers");
    inits.insert(0, init);
    let cs = array_at(spec, "containers");
    if hold {
        cs.insert(0, proxy);
    } else {
        cs.push(proxy);
    }
    let volumes = array_at(spec, "volumes");
    volumes.extend([
        json!({
            "name": "istio-token",
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}
        }),
        json!({"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}}),
        json!({
            "name": "istio-podinfo",
            "downwardAPI": {"items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
            ]}
        }),
    ]);
    Ok(true)
}

fn containers<'a>(spec: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    spec[key].as_array().into_iter().flatten()
}

/// `v[key]` as an object, made one if it is not.
fn object<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let Some(m) = v.as_object_mut() else {
        unreachable!("pods are objects: checked by the caller")
    };
    object_at(m, key)
}

fn object_at<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let e = m.entry(key).or_insert_with(|| json!({}));
    if !e.is_object() {
        *e = json!({});
    }
    match e {
        Value::Object(o) => o,
        _ => unreachable!("set to an object above"),
    }
}

fn array_at<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Vec<Value> {
    let e = m.entry(key).or_insert_with(|| json!([]));
    if !e.is_array() {
        *e = json!([]);
    }
    match e {
        Value::Array(a) => a,
        _ => unreachable!("set to an array above"),
    }
}

fn init_container(pod: &Value, opts: &InjectOptions) -> Value {
    let mut args = vec![json!("capture")];
    for (annotation_key, flag) in CAPTURE_ANNOTATIONS {
        if let Some(v) = annotation(pod, annotation_key) {
            args.push(json!(format!("{flag}={v}")));
        }
    }
    json!({
        "name": INIT_NAME,
        "image": opts.image,
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "40Mi"},
            "limits": {"cpu": "2000m", "memory": "1024Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": false,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "runAsUser": 0,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

fn proxy_container(
    pod: &Value,
    opts: &InjectOptions,
    hold: bool,
    probers: &Map<String, Value>,
) -> Result<Value, String> {
    let res =
        |key: &str, default: &str| -> Value { json!(annotation(pod, key).unwrap_or(default)) };
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}),
    ];
    if !probers.is_empty() {
        env.push(json!({
            "name": "ISTIO_KUBE_APP_PROBERS",
            "value": Value::Object(probers.clone()).to_string(),
        }));
    }
    let mut c = json!({
        "name": PROXY_NAME,
        "image": opts.image,
        "args": [
            "proxy", "--mode", "sidecar", "--capture",
            "--xds", opts.control_address,
            "--control-name", opts.control_name,
            "--ca-root-cert", "/var/run/secrets/istio/root-cert.pem",
            "--token-file", "/var/run/secrets/tokens/istio-token",
            "--trust-domain", opts.trust_domain,
            "--namespace", "$(POD_NAMESPACE)",
            "--service-account", "$(SERVICE_ACCOUNT)",
            "--workload", "$(POD_NAME)",
            "--labels-file", "/etc/istio/pod/labels",
            "--inbound-address", "0.0.0.0:15006",
            "--outbound-address", "127.0.0.1:15001",
            "--status-address", format!("0.0.0.0:{HEALTH_PORT},0.0.0.0:{READY_PORT}"),
            "--exit-on-zero-active-connections",
        ],
        "env": env,
        "ports": [
            {"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"},
            {"containerPort": READY_PORT, "name": "status-port", "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": READY_PORT},
            "initialDelaySeconds": 0,
            "periodSeconds": 2,
            "timeoutSeconds": 3,
            "failureThreshold": 30,
        },
        "resources": {
            "requests": {
                "cpu": res("sidecar.istio.io/proxyCPU", "100m"),
                "memory": res("sidecar.istio.io/proxyMemory", "128Mi"),
            },
            "limits": {
                "cpu": res("sidecar.istio.io/proxyCPULimit", "2000m"),
                "memory": res("sidecar.istio.io/proxyMemoryLimit", "1024Mi"),
            },
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsGroup": 1337,
            "runAsNonRoot": true,
            "runAsUser": 1337,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens"},
            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio"},
            {"name": "istio-podinfo", "mountPath": "/etc/istio/pod"},
        ],
    });
    if hold && let Some(m) = c.as_object_mut() {
        m.insert(
            "lifecycle".into(),
            json!({"postStart": {"exec": {"command": [
                "bosun", "wait", "--url", format!("http://127.0.0.1:{READY_PORT}/healthz/ready"), "--timeout", "60s"
            ]}}}),
        );
    }
    Ok(c)
}

/// Rewrites the app containers' httpGet, tcpSocket and grpc probes to the
/// proxy's health port; returns what the proxy runs for each path
/// (Istio's `ISTIO_KUBE_APP_PROBERS`).
fn rewrite_probes(pod: &mut Value, enabled: bool) -> Result<Map<String, Value>, String> {
    let mut probers = Map::new();
    if !enabled {
        return Ok(probers);
    }
    let Some(cs) = pod
        .pointer_mut("/spec/containers")
        .and_then(Value::as_array_mut)
    else {
        return Ok(probers);
    };
    for (ci, c) in cs.iter_mut().enumerate() {
        let cname = c["name"].as_str().unwrap_or("").to_string();
        let ports = c["ports"].clone();
        for (key, suffix) in [
            ("livenessProbe", "livez"),
            ("readinessProbe", "readyz"),
            ("startupProbe", "startupz"),
        ] {
            let Some(probe) = c.get_mut(key).and_then(Value::as_object_mut) else {
                continue;
            };
            let field = format!("spec.containers[{ci}].{key}");
            let (handler, mut spec) = if let Some(h) = probe.get("httpGet") {
                ("httpGet", h.clone())
            } else if let Some(h) = probe.get("tcpSocket") {
                ("tcpSocket", h.clone())
            } else if let Some(h) = probe.get("grpc") {
                ("grpc", h.clone())
            } else {
                continue;
            };
            let port = resolve_port(&spec["port"], &ports).ok_or_else(|| {
                format!(
                    "{field}.{handler}.port: {} is not a port of the container",
                    spec["port"]
                )
            })?;
            if port == HEALTH_PORT || port == READY_PORT {
                continue;
            }
            if let Some(m) = spec.as_object_mut() {
                m.insert("port".into(), json!(port));
            }
            let path = format!("/app-health/{cname}/{suffix}");
            let mut prober = Map::new();
            prober.insert(handler.into(), spec);
            if let Some(t) = probe.get("timeoutSeconds") {
                prober.insert("timeoutSeconds".into(), t.clone());
            }
            probers.insert(path.clone(), Value::Object(prober));
            probe.remove(handler);
            probe.insert(
                "httpGet".into(),
                json!({"path": path, "port": HEALTH_PORT, "scheme": "HTTP"}),
            );
        }
    }
    Ok(probers)
}

/// A probe's port: a number, or a container port's name.
fn resolve_port(port: &Value, ports: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => match s.parse::<u16>() {
            Ok(n) => Some(n),
            Err(_) => ports
                .as_array()?
                .iter()
                .find(|p| p["name"] == s.as_str())
                .and_then(|p| p["containerPort"].as_u64())
                .and_then(|n| u16::try_from(n).ok()),
        },
        _ => None,
    }
}

/// The admission webhook: an `AdmissionReview` (v1) in, one out whose
/// response carries a JSONPatch that injects the pod (or none, allowed).
pub fn review(request: &Value, opts: &InjectOptions) -> Value {
    let req = &request["request"];
    let uid = req["uid"].clone();
    let mut pod = req["object"].clone();
    let workload = pod["metadata"]["name"]
        .as_str()
        .or(pod["metadata"]["generateName"]
            .as_str()
            .map(|g| g.trim_end_matches('-')))
        .unwrap_or("")
        .to_string();
    let allowed = |patch: Option<String>| {
        let mut resp = json!({"uid": uid, "allowed": true});
        if let (Some(p), Some(m)) = (patch, resp.as_object_mut()) {
            use base64::Engine;
            m.insert("patchType".into(), json!("JSONPatch"));
            m.insert(
                "patch".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(p)),
            );
        }
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": resp,
        })
    };
    if req["kind"]["kind"] != "Pod" || !pod.is_object() {
        return allowed(None);
    }
    let before = pod.clone();
    match inject_pod(&mut pod, &workload, opts) {
        Ok(true) => {
            let mut ops = Vec::new();
            for key in ["labels", "annotations"] {
                if before["metadata"][key] != pod["metadata"][key] {
                    ops.push(json!({"op": "add", "path": format!("/metadata/{key}"), "value": pod["metadata"][key]}));
                }
            }
            ops.push(json!({"op": "add", "path": "/spec", "value": pod["spec"]}));
            allowed(Some(Value::Array(ops).to_string()))
        }
        Ok(false) => allowed(None),
        // Injection failing must not block the pod? Istio fails closed
        // (failurePolicy Fail) with the reason; so does Bosun.
        Err(e) => json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": uid, "allowed": false, "status": {"code": 400, "message": format!("bosun injection: {e}")}},
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"app": "web", "version": "v2"}},
            "spec": {"containers": [{
                "name": "web", "image": "nginx",
                "ports": [{"name": "http", "containerPort": 8080}],
                "livenessProbe": {"httpGet": {"path": "/live", "port": "http"}, "timeoutSeconds": 2},
                "readinessProbe": {"tcpSocket": {"port": 8080}},
                "startupProbe": {"exec": {"command": ["true"]}},
            }]}
        })
    }

    #[test]
    fn injects_once_and_rewrites_probes() {
        let opts = InjectOptions::default();
        let mut p = pod();
        assert_eq!(inject_pod(&mut p, "web", &opts), Ok(true));
        let again = p.clone();
        assert_eq!(inject_pod(&mut p, "web", &opts), Ok(false));
        assert_eq!(p, again);
        let c = &p["spec"]["containers"][0];
        assert_eq!(
            c["livenessProbe"]["httpGet"]["path"],
            "/app-health/web/livez"
        );
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], 15020);
        assert_eq!(
            c["readinessProbe"]["httpGet"]["path"],
            "/app-health/web/readyz"
        );
        assert!(c["readinessProbe"].get("tcpSocket").is_none());
        assert!(c["startupProbe"].get("exec").is_some());
        let proxy = &p["spec"]["containers"][1];
        assert_eq!(proxy["name"], PROXY_NAME);
        let env = proxy["env"].as_array().expect("env");
        let probers = env
            .iter()
            .find(|e| e["name"] == "ISTIO_KUBE_APP_PROBERS")
            .expect("probers");
        let probers: Value =
            serde_json::from_str(probers["value"].as_str().expect("str")).expect("json");
        assert_eq!(probers["/app-health/web/livez"]["httpGet"]["port"], 8080);
        assert_eq!(probers["/app-health/web/livez"]["timeoutSeconds"], 2);
        assert_eq!(probers["/app-health/web/readyz"]["tcpSocket"]["port"], 8080);
        assert_eq!(
            p["metadata"]["labels"]["security.istio.io/tlsMode"],
            "istio"
        );
        assert_eq!(
            p["metadata"]["labels"]["service.istio.io/canonical-revision"],
            "v2"
        );
        assert_eq!(
            p["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"],
            json!(["NET_ADMIN", "NET_RAW"])
        );
    }

    #[test]
    fn opt_out_host_network_and_hold() {
        let opts = InjectOptions::default();
        let mut p = pod();
        p["metadata"]["annotations"] = json!({"sidecar.istio.io/inject": "false"});
        assert_eq!(inject_pod(&mut p, "web", &opts), Ok(false));
        let mut p = pod();
        p["spec"]["hostNetwork"] = json!(true);
        assert_eq!(inject_pod(&mut p, "web", &opts), Ok(false));
        let mut p = pod();
        p["metadata"]["annotations"] =
            json!({"proxy.istio.io/config": "holdApplicationUntilProxyStarts: true"});
        assert_eq!(inject_pod(&mut p, "web", &opts), Ok(true));
        assert_eq!(p["spec"]["containers"][0]["name"], PROXY_NAME);
        assert!(p["spec"]["containers"][0]["lifecycle"]["postStart"].is_object());
        let mut p = pod();
        p["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = json!("nope");
        assert!(inject_pod(&mut p, "web", &opts).is_err());
    }
}
