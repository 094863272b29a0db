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

/// `--ca-secret NAMESPACE/NAME` with the ambient credentials.
pub async fn ca_from_secret(
    secret: &str,
    trust_domain: &str,
) -> Result<crate::ca::CaFiles, String> {
    let (ns, name) = secret
        .split_once('/')
        .ok_or_else(|| format!("--ca-secret {secret:?}: want NAMESPACE/NAME"))?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("Kubernetes client for the CA Secret: {e}"))?;
    ca_secret(&client, ns, name, trust_domain).await
}

/// The CA kept in a Secret (Istio's `istio-ca-secret` layout: `ca-cert.pem`,
/// `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`): read if it exists,
/// else a new root is made and the Secret created. Two replicas starting
/// at once: the one whose create loses (409) reads the winner's.
pub async fn ca_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<crate::ca::CaFiles, String> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let place = format!("Secret {namespace}/{name}");
    let read = |s: Secret| -> Result<crate::ca::CaFiles, String> {
        let data = s.data.unwrap_or_default();
        let get = |k: &str| -> Option<String> {
            data.get(k)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        };
        let cert = get(crate::ca::CA_CERT).ok_or(format!("{place}: no {}", crate::ca::CA_CERT))?;
        let key = get(crate::ca::CA_KEY).ok_or(format!("{place}: no {}", crate::ca::CA_KEY))?;
        Ok(crate::ca::CaFiles {
            roots: get(crate::ca::ROOT_CERT).unwrap_or_else(|| cert.clone()),
            chain: get(crate::ca::CERT_CHAIN).unwrap_or_else(|| cert.clone()),
            cert,
            key,
        })
    };
    if let Some(s) = api
        .get_opt(name)
        .await
        .map_err(|e| format!("{place}: {e}"))?
    {
        return read(s);
    }
    let (cert, key) = crate::ca::generate_root(trust_domain)?;
    let mut data = std::collections::BTreeMap::new();
    for (k, v) in [
        (crate::ca::CA_CERT, &cert),
        (crate::ca::CA_KEY, &key),
        (crate::ca::ROOT_CERT, &cert),
        (crate::ca::CERT_CHAIN, &cert),
    ] {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(data),
        ..Default::default()
    };
    match api.create(&kube::api::PostParams::default(), &secret).await {
        Ok(s) => {
            tracing::info!(secret = %place, "made a new root CA");
            read(s)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await.map_err(|e| format!("{place}: {e}"))?;
            read(s)
        }
        Err(e) => Err(format!("{place}: create: {e}")),
    }
}

/// What injected pods need from the control on a cluster, kept up to date
/// every `every`: the mesh roots as the ConfigMap `istio-ca-root-cert`
/// (key `root-cert.pem`) in every namespace, as istiod publishes them, and
/// the roots as the `caBundle` of the injector's
/// MutatingWebhookConfiguration `webhook` (when it exists), so the API
/// server trusts the webhook's certificate.
pub async fn publish_roots(roots_pem: String, webhook: Option<String>, every: Duration) {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Kubernetes client: the root ConfigMaps are not published");
            return;
        }
    };
    loop {
        if let Err(e) = publish_root_configmaps(&client, &roots_pem).await {
            tracing::warn!(error = %e, "publishing istio-ca-root-cert");
        }
        if let Some(name) = &webhook
            && let Err(e) = patch_ca_bundle(&client, name, &roots_pem).await
        {
            tracing::warn!(error = %e, webhook = %name, "setting the webhook's caBundle");
        }
        tokio::time::sleep(every).await;
    }
}

pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";

pub async fn publish_root_configmaps(client: &kube::Client, roots_pem: &str) -> Result<(), String> {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let list = namespaces
        .list(&Default::default())
        .await
        .map_err(|e| format!("list namespaces: {e}"))?;
    for ns in list.items {
        let Some(name) = ns.metadata.name else {
            continue;
        };
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
        let data: std::collections::BTreeMap<String, String> =
            [("root-cert.pem".to_string(), roots_pem.to_string())].into();
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(ROOT_CONFIGMAP.into()),
                namespace: Some(name.clone()),
                labels: Some([("istio.io/config".to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            data: Some(data.clone()),
            ..Default::default()
        };
        match api.create(&kube::api::PostParams::default(), &cm).await {
            Ok(_) => tracing::info!(namespace = %name, "published {ROOT_CONFIGMAP}"),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let mut current = api
                    .get(ROOT_CONFIGMAP)
                    .await
                    .map_err(|e| format!("{name}/{ROOT_CONFIGMAP}: {e}"))?;
                if current.data.as_ref() != Some(&data) {
                    current.data = Some(data);
                    api.replace(ROOT_CONFIGMAP, &Default::default(), &current)
                        .await
                        .map_err(|e| format!("{name}/{ROOT_CONFIGMAP}: replace: {e}"))?;
                    tracing::info!(namespace = %name, "updated {ROOT_CONFIGMAP}");
                }
            }
            Err(e) => return Err(format!("{name}/{ROOT_CONFIGMAP}: create: {e}")),
        }
    }
    Ok(())
}

pub async fn patch_ca_bundle(
    client: &kube::Client,
    name: &str,
    roots_pem: &str,
) -> Result<(), String> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut mwc) = api.get_opt(name).await.map_err(|e| format!("get: {e}"))? else {
        return Ok(());
    };
    let bundle = ByteString(roots_pem.as_bytes().to_vec());
    let mut changed = false;
    for w in mwc.webhooks.iter_mut().flatten() {
        if w.client_config.ca_bundle.as_ref() != Some(&bundle) {
            w.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(name, &Default::default(), &mwc)
            .await
            .map_err(|e| format!("replace: {e}"))?;
        tracing::info!(webhook = %name, "caBundle set to the mesh roots");
    }
    Ok(())
}
