//! The Kubernetes source against a stand-in API server: no real cluster can
//! run here, so a small HTTP server answers kube-rs's list and watch calls
//! with responses shaped like a real API server's (recorded objects with
//! their managedFields, uids and server-defaulted fields).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::harness::*;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

struct StandIn {
    addr: SocketAddr,
    /// Objects created with POST, by their path.
    objects: Arc<Mutex<HashMap<String, Value>>>,
    /// (collection path, watch event line) to every open watch.
    events: broadcast::Sender<(String, String)>,
}

fn meta(name: &str, ns: &str, rv: &str) -> Value {
    json!({
        "name": name, "namespace": ns, "uid": format!("uid-{name}"), "resourceVersion": rv,
        "generation": 1, "creationTimestamp": "2026-11-22T07:00:00Z",
        "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {}}]
    })
}

/// Serves `lists` (collection path → items); watches stream what `events` carries.
async fn stand_in(lists: HashMap<String, Vec<Value>>) -> StandIn {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (events, _) = broadcast::channel::<(String, String)>(64);
    let lists = Arc::new(Mutex::new(lists));
    let objects: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
    let ev = events.clone();
    let objs = objects.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = l.accept().await {
            let (lists, ev, objs) = (lists.clone(), ev.clone(), objs.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let (lists, ev, objs) = (lists.clone(), ev.clone(), objs.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            if req.method() == http::Method::POST && path.ends_with("/tokenreviews")
                            {
                                return Ok::<_, Infallible>(token_review(req).await);
                            }
                            if req.method() == http::Method::POST {
                                return Ok(create(&objs, &path, req).await);
                            }
                            if req.method() == http::Method::PUT {
                                let obj = body_json(req).await;
                                objs.lock().expect("lock").insert(path, obj.clone());
                                return Ok(json_response(http::StatusCode::OK, &obj));
                            }
                            let stored = objs.lock().expect("lock").get(&path).cloned();
                            if let Some(o) = stored {
                                return Ok(json_response(http::StatusCode::OK, &o));
                            }
                            let watch = req.uri().query().is_some_and(|q| {
                                q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1")
                            });
                            let body: Body = if watch {
                                let rx = ev.subscribe();
                                let s = futures_util::stream::unfold(
                                    (rx, path),
                                    |(mut rx, path)| async move {
                                        loop {
                                            match rx.recv().await {
                                                Ok((p, line)) if p == path => {
                                                    let frame = Frame::data(Bytes::from(format!(
                                                        "{line}\n"
                                                    )));
                                                    return Some((
                                                        Ok::<_, Infallible>(frame),
                                                        (rx, path),
                                                    ));
                                                }
                                                Ok(_)
                                                | Err(broadcast::error::RecvError::Lagged(_)) => {
                                                    continue;
                                                }
                                                Err(_) => return None,
                                            }
                                        }
                                    },
                                );
                                StreamBody::new(s).boxed()
                            } else {
                                let items = lists.lock().expect("lock").get(&path).cloned();
                                match items {
                                Some(items) => Full::new(Bytes::from(
                                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "100"}, "items": items})
                                        .to_string(),
                                ))
                                .boxed(),
                                None => {
                                    return Ok::<_, Infallible>(json_response(
                                        http::StatusCode::NOT_FOUND,
                                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                                "message": format!("{path} not found"), "reason": "NotFound", "code": 404}),
                                    ));
                                }
                            }
                            };
                            let mut r = http::Response::new(body);
                            r.headers_mut().insert(
                                "content-type",
                                http::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, Infallible>(r)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    StandIn {
        addr,
        objects,
        events,
    }
}

async fn body_json(req: http::Request<hyper::body::Incoming>) -> Value {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

fn json_response(status: http::StatusCode, v: &Value) -> http::Response<Body> {
    let mut r = http::Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// POST to a collection: stored under `<collection>/<name>`; 409 if it exists.
async fn create(
    objs: &Mutex<HashMap<String, Value>>,
    path: &str,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Body> {
    let mut obj = body_json(req).await;
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    obj["metadata"]["resourceVersion"] = json!("1");
    let key = format!("{path}/{name}");
    let mut m = objs.lock().expect("lock");
    if m.contains_key(&key) {
        return json_response(
            http::StatusCode::CONFLICT,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "already exists", "reason": "AlreadyExists", "code": 409}),
        );
    }
    m.insert(key, obj.clone());
    json_response(http::StatusCode::CREATED, &obj)
}

/// Every kind Bosun watches, with no objects.
fn empty_lists() -> HashMap<String, Vec<Value>> {
    let mut lists = HashMap::new();
    for (group, version, _, plural) in bosun_control::kubernetes::KINDS {
        let path = if group.is_empty() {
            format!("/api/{version}/{plural}")
        } else {
            format!("/apis/{group}/{version}/{plural}")
        };
        lists.insert(path, vec![]);
    }
    lists
}

/// Every kind empty but one Service: enough for a valid config.
fn one_service() -> HashMap<String, Vec<Value>> {
    let mut lists = empty_lists();
    lists.insert(
        "/api/v1/services".into(),
        vec![json!({"metadata": meta("web", "shop", "12"),
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}], "selector": {"app": "web"},
                     "clusterIP": "10.96.0.10", "type": "ClusterIP"}})],
    );
    lists
}

/// A kubeconfig in `dir` for the stand-in at `addr`.
fn kubeconfig(dir: &std::path::Path, addr: SocketAddr) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster: {{server: \"http://{addr}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: standin, user: u}}\ncurrent-context: c\n"
        ),
    )
    .expect("kubeconfig");
    path
}

/// The stand-in's TokenReview: one known ServiceAccount token, valid for
/// the audience `istio-ca` only.
const SA_TOKEN: &str = "k8s-projected-token-of-productpage";

async fn token_review(req: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
    let review = body_json(req).await;
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let audience_ok = review["spec"]["audiences"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == "istio-ca"));
    let status = if token == SA_TOKEN && audience_ok {
        json!({"authenticated": true, "audiences": ["istio-ca"],
               "user": {"username": "system:serviceaccount:default:productpage", "uid": "uid-sa",
                        "groups": ["system:serviceaccounts", "system:serviceaccounts:default"]}})
    } else {
        json!({"authenticated": false, "error": "invalid bearer token"})
    };
    let out = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                     "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status});
    let mut r = http::Response::new(Full::new(Bytes::from(out.to_string())).boxed());
    *r.status_mut() = http::StatusCode::CREATED;
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn slice(port: u16, rv: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abcde", "namespace": "shop", "uid": "uid-slice", "resourceVersion": rv,
            "generateName": "web-", "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "uid-web", "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true, "serving": true, "terminating": false},
                        "nodeName": "node-1", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "uid-pod"}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kubernetes_source_lists_watches_and_pushes_to_proxies() {
    let (v1, v2) = (backend("v1").await, backend("v2").await);
    let port = free_port();
    let mut lists = empty_lists();
    lists.insert(
        "/apis/networking.istio.io/v1/gateways".into(),
        vec![json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": meta("gw", "shop", "10"),
            "spec": {"selector": {"istio": "ingressgateway"}, "servers": [{"port": {"number": port, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}})],
    );
    lists.insert(
        "/apis/networking.istio.io/v1/virtualservices".into(),
        vec![json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": meta("web", "shop", "11"),
            "spec": {"hosts": ["*"], "gateways": ["gw"], "http": [{"route": [{"destination": {"host": "web"}}]}]}})],
    );
    // Built-in kinds come in lists without apiVersion/kind, with server defaults.
    lists.insert(
        "/api/v1/services".into(),
        vec![json!({"metadata": meta("web", "shop", "12"),
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}], "selector": {"app": "web"},
                     "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "type": "ClusterIP", "sessionAffinity": "None",
                     "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster"},
            "status": {"loadBalancer": {}}})],
    );
    lists.insert(
        "/apis/discovery.k8s.io/v1/endpointslices".into(),
        vec![slice(v1.addr.port(), "13")],
    );
    let api = stand_in(lists).await;

    let dir = TempDir::new("kube");
    let kubeconfig = kubeconfig(&dir.0, api.addr);
    let control = Control::start_kubernetes(&kubeconfig, &dir.0.join("control")).await;
    let proxy = Bosun::with_xds(
        control.xds,
        &[
            "--mode",
            "gateway",
            "--gateway-address",
            "127.0.0.6",
            "--node-id",
            "gw-kube",
        ],
    );
    proxy.wait_ready().await;
    let c = client();
    let url = format!("http://127.0.0.6:{port}/");
    assert_eq!(get(&c, &url, "shop.example").await.backend(), "v1");

    // A watch event moves the endpoint: the proxy follows.
    let event = json!({"type": "MODIFIED", "object": slice(v2.addr.port(), "14")}).to_string();
    let path = "/apis/discovery.k8s.io/v1/endpointslices".to_string();
    eventually("the watch event reaches the proxy", || {
        let _ = api.events.send((path.clone(), event.clone()));
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url, "shop.example").await.backend() == "v2" }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_kubernetes_the_ca_checks_service_account_tokens_by_token_review() {
    use bosun_proxy::tls;
    let api = stand_in(one_service()).await;
    let dir = TempDir::new("kube-ca");
    let kubeconfig = kubeconfig(&dir.0, api.addr);
    let ca = dir.0.join("ca");
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let _control = Control::start_kubernetes_args(
        &kubeconfig,
        &dir.0.join("control"),
        &[
            "--ca-dir",
            ca.to_str().expect("utf8"),
            "--xds-tls-addr",
            &tls_addr.to_string(),
        ],
    )
    .await;
    let token = |t: &str| {
        let p = dir.0.join(format!("{}.token", t.len()));
        std::fs::write(&p, t).expect("token");
        p
    };
    let opts = |token_file: std::path::PathBuf, sa: &str| tls::ca::CaOptions {
        address: format!("https://{tls_addr}"),
        server_name: "bosun-control.istio-system.svc".into(),
        root_cert: ca.join("root-cert.pem"),
        token_file,
        spiffe: format!("spiffe://cluster.local/ns/default/sa/{sa}"),
        ttl: std::time::Duration::from_secs(600),
    };
    let id = tls::ca::request(&opts(token(SA_TOKEN), "productpage"))
        .await
        .expect("a certificate for the token's service account");
    assert_eq!(
        id.spiffe,
        "spiffe://cluster.local/ns/default/sa/productpage"
    );
    let e = tls::ca::request(&opts(token(SA_TOKEN), "reviews"))
        .await
        .expect_err("another service account");
    assert!(e.contains("PermissionDenied"), "{e}");
    let e = tls::ca::request(&opts(
        token("a-token-the-api-server-never-issued"),
        "productpage",
    ))
    .await
    .expect_err("unknown token");
    assert!(
        e.contains("Unauthenticated") && e.contains("invalid bearer token"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_kubernetes_the_ca_lives_in_the_istio_ca_secret_across_restarts() {
    use base64::Engine;
    use bosun_proxy::tls;
    let api = stand_in(one_service()).await;
    let dir = TempDir::new("kube-ca-secret");
    let kubeconfig = kubeconfig(&dir.0, api.addr);
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let args = [
        "--ca-secret",
        "istio-system/istio-ca-secret",
        "--xds-tls-addr",
        &tls_addr.to_string(),
    ];
    let mut first = Control::start_kubernetes_args(&kubeconfig, &dir.0.join("c1"), &args).await;
    let key = "/api/v1/namespaces/istio-system/secrets/istio-ca-secret";
    let secret = api
        .objects
        .lock()
        .expect("lock")
        .get(key)
        .cloned()
        .expect("the CA Secret was created");
    assert_eq!(secret["type"], "istio.io/ca-root");
    let root = base64::engine::general_purpose::STANDARD
        .decode(
            secret["data"]["root-cert.pem"]
                .as_str()
                .expect("root-cert.pem"),
        )
        .expect("base64");
    let root_file = dir.0.join("root-cert.pem");
    std::fs::write(&root_file, &root).expect("root");
    let token = dir.0.join("sa.token");
    std::fs::write(&token, SA_TOKEN).expect("token");
    let opts = tls::ca::CaOptions {
        address: format!("https://{tls_addr}"),
        server_name: "bosun-control.istio-system.svc".into(),
        root_cert: root_file,
        token_file: token,
        spiffe: "spiffe://cluster.local/ns/default/sa/productpage".into(),
        ttl: std::time::Duration::from_secs(600),
    };
    tls::ca::request(&opts)
        .await
        .expect("a certificate from the first control");
    // A restarted control reads the Secret: the same root still verifies it.
    first.kill();
    let _second = Control::start_kubernetes_args(&kubeconfig, &dir.0.join("c2"), &args).await;
    tls::ca::request(&opts)
        .await
        .expect("a certificate from the restarted control, under the same root");
    assert_eq!(api.objects.lock().expect("lock").len(), 1);
}

/// On a cluster the control publishes what injected pods mount (the
/// roots as ConfigMap istio-ca-root-cert in every namespace) and sets the
/// injector webhook's caBundle to the roots.
#[tokio::test(flavor = "multi_thread")]
async fn with_kubernetes_the_control_publishes_the_roots_and_the_webhook_ca_bundle() {
    use base64::Engine;
    let mut lists = one_service();
    lists.insert(
        "/api/v1/namespaces".into(),
        vec![
            json!({"metadata": meta("default", "", "1")}),
            json!({"metadata": meta("shop", "", "1")}),
        ],
    );
    let api = stand_in(lists).await;
    let mwc = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/bosun-sidecar-injector";
    api.objects.lock().expect("lock").insert(
        mwc.into(),
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
               "metadata": meta("bosun-sidecar-injector", "", "5"),
               "webhooks": [{"name": "sidecar-injector.bosun.io", "admissionReviewVersions": ["v1"],
                             "sideEffects": "None",
                             "clientConfig": {"service": {"name": "bosun-control", "namespace": "istio-system", "path": "/inject", "port": 443}}}]}),
    );
    let dir = TempDir::new("kube-roots");
    let kubeconfig = kubeconfig(&dir.0, api.addr);
    let tls_addr = format!("127.0.0.1:{}", free_port());
    let webhook = format!("127.0.0.1:{}", free_port());
    let _c = Control::start_kubernetes_args(
        &kubeconfig,
        &dir.0.join("c"),
        &[
            "--ca-secret",
            "istio-system/istio-ca-secret",
            "--xds-tls-addr",
            &tls_addr,
            "--webhook-address",
            &webhook,
        ],
    )
    .await;
    let get = |k: &str| api.objects.lock().expect("lock").get(k).cloned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let done = ["default", "shop"].iter().all(|ns| {
            get(&format!(
                "/api/v1/namespaces/{ns}/configmaps/istio-ca-root-cert"
            ))
            .is_some()
        }) && get(mwc)
            .is_some_and(|m| m["webhooks"][0]["clientConfig"]["caBundle"].is_string());
        if done {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not published: {:?}",
            api.objects.lock().expect("lock").keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let secret = get("/api/v1/namespaces/istio-system/secrets/istio-ca-secret").expect("CA secret");
    let root = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["root-cert.pem"].as_str().expect("root"))
        .expect("base64");
    let cm = get("/api/v1/namespaces/shop/configmaps/istio-ca-root-cert").expect("cm");
    assert_eq!(
        cm["data"]["root-cert.pem"].as_str().map(str::as_bytes),
        Some(root.as_slice())
    );
    let bundle = get(mwc).expect("mwc")["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .map(str::to_string)
        .expect("caBundle");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(bundle)
            .expect("base64"),
        root
    );
}
