//! The Kubernetes source: kube-rs watchers (list, then watch, with
//! backoff) on Istio's networking CRDs, Services, EndpointSlices and Pods
//! (for their labels).
//!
//! Every object is turned back into the document a user would have
//! written (`apiVersion`, `kind`, `metadata`, `spec`) and read by the same
//! loader as files, so a field Bosun does not implement is refused the same
//! way, named `k8s:<Kind>/<namespace>/<name>`. Credentials: in-cluster
//! service account or the kubeconfig (`KUBECONFIG`), as `kubectl` finds them.

use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::store::Writer;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::mpsc;

use crate::load::ParseCache;
use crate::source::Reading;

/// (group, version, kind, plural) of everything Bosun reads.
pub const KINDS: [(&str, &str, &str, &str); 11] = [
    (
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
    ),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    ("networking.istio.io", "v1", "Gateway", "gateways"),
    (
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
    ),
    (
        "networking.istio.io",
        "v1",
        "WorkloadEntry",
        "workloadentries",
    ),
    ("networking.istio.io", "v1", "Sidecar", "sidecars"),
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    ("", "v1", "Service", "services"),
    ("", "v1", "Pod", "pods"),
    ("", "v1", "Secret", "secrets"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
];

/// Connects with the ambient credentials and watches every kind.
pub async fn watch() -> Result<mpsc::Receiver<Reading>, String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("Kubernetes client (in-cluster or kubeconfig): {e}"))?;
    Ok(watch_with(client))
}

pub fn watch_with(client: kube::Client) -> mpsc::Receiver<Reading> {
    let (tx, rx) = mpsc::channel(4);
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    let mut stores = Vec::new();
    for (group, version, kind, plural) in KINDS {
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let writer = Writer::new(ar.clone());
        stores.push((ar, writer.as_reader()));
        let wake = wake_tx.clone();
        tokio::spawn(async move {
            let stream =
                reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(_) => {
                        let _ = wake.try_send(());
                    }
                    Err(e) => {
                        tracing::warn!(%kind, error = %e, "Kubernetes watch failed; retrying")
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        for (ar, store) in &stores {
            if store.wait_until_ready().await.is_err() {
                tracing::error!(kind = %ar.kind, "Kubernetes watcher stopped");
                return;
            }
        }
        let mut cache = ParseCache::default();
        let mut last = None;
        loop {
            let mut sources = Vec::new();
            for (ar, store) in &stores {
                for obj in store.state() {
                    let mut v = serde_json::to_value(&*obj).unwrap_or_default();
                    // List items of built-in kinds come without their type.
                    v["apiVersion"] = ar.api_version.clone().into();
                    v["kind"] = ar.kind.clone().into();
                    let ns = obj.metadata.namespace.clone().unwrap_or_default();
                    let name = obj.metadata.name.clone().unwrap_or_default();
                    sources.push((format!("k8s:{}/{ns}/{name}", ar.kind), v.to_string()));
                }
            }
            sources.sort();
            if last.as_ref() != Some(&sources) {
                if tx.send(cache.load(&sources)).await.is_err() {
                    return;
                }
                last = Some(sources);
            }
            if wake_rx.recv().await.is_none() {
                return;
            }
            // Let a burst of events settle into one reading.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while wake_rx.try_recv().is_ok() {}
        }
    });
    rx
}

/// Checks a ServiceAccount token with a TokenReview (audience `istio-ca`,
/// as Istio's projected tokens carry): the namespace and service account
/// it belongs to, or why not.
pub async fn token_review(client: &kube::Client, token: &str) -> Result<(String, String), String> {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: Some(vec!["istio-ca".into()]),
        },
        ..Default::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let done = api
        .create(&kube::api::PostParams::default(), &review)
        .await
        .map_err(|e| format!("TokenReview: {e}"))?;
    let status = done.status.ok_or("TokenReview: no status")?;
    if status.authenticated != Some(true) {
        return Err(format!(
            "token not authenticated: {}",
            status.error.unwrap_or_default()
        ));
    }
    let user = status.user.and_then(|u| u.username).unwrap_or_default();
    // system:serviceaccount:<namespace>:<name>
    let mut parts = user.splitn(4, ':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("system"), Some("serviceaccount"), Some(ns), Some(sa)) => Ok((ns.into(), sa.into())),
        _ => Err(format!("token of {user:?}, not a service account")),
    }
}
