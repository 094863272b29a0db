//! The xDS client: subscribes to Bosun's four resource types over ADS
//! (incremental by default, state of the world on request), applies a
//! consistent set, and ACKs or NACKs it. While the control service is gone
//! the proxy keeps serving its last applied config and reconnects with
//! exponential backoff and jitter; on reconnect (delta) it tells the server
//! which resource versions it already has, so nothing is re-applied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bosun_xds_proto::Any;
use bosun_xds_proto::config as pb;
use bosun_xds_proto::core::Node;
use bosun_xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use bosun_xds_proto::discovery::{DeltaDiscoveryRequest, DiscoveryRequest};
use bosun_xds_proto::prost::Message;
use bosun_xds_proto::rpc::Status as RpcStatus;
use bosun_xds_proto::{MORE, PUSH_END, Reconnect, type_url};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Proxy;

#[derive(Clone, Debug)]
pub struct XdsOptions {
    /// Control service replicas, e.g. `http://127.0.0.1:15010`; the client
    /// moves to the next one when a stream fails.
    pub addresses: Vec<String>,
    pub node: Node,
    /// Incremental (delta) ADS; false: state of the world.
    pub delta: bool,
    /// For `https://` addresses: how the control is checked, and the
    /// workload certificate the proxy authenticates with.
    pub tls: Option<XdsTls>,
}

#[derive(Clone, Debug)]
pub struct XdsTls {
    /// The name the control's serving certificate carries.
    pub server_name: String,
    /// PEM roots it must chain to.
    pub root_cert: std::path::PathBuf,
    pub store: Arc<crate::tls::Store>,
}

type TypeState = BTreeMap<String, (String, Any)>;

/// What was last applied, by type URL: name → (version, resource).
#[derive(Default, Clone)]
struct Applied {
    by_type: BTreeMap<String, TypeState>,
}

fn decode<M: Message + Default>(any: &Any) -> Result<M, String> {
    M::decode(any.value.as_ref()).map_err(|e| format!("{}: cannot decode: {e}", any.type_url))
}

/// Builds one ProxyConfig from the resources of every type.
fn assemble(state: &BTreeMap<String, TypeState>, version: &str) -> Result<pb::ProxyConfig, String> {
    let mut cfg = pb::ProxyConfig {
        version: version.to_string(),
        ..Default::default()
    };
    for (t, resources) in state {
        for (_, any) in resources.values() {
            if any.type_url != *t {
                return Err(format!(
                    "resource of type {} in a {t} response",
                    any.type_url
                ));
            }
            match t.as_str() {
                type_url::LISTENER => cfg.listeners.push(decode(any)?),
                type_url::ROUTE_CONFIGURATION => cfg.route_configurations.push(decode(any)?),
                type_url::CLUSTER => cfg.clusters.push(decode(any)?),
                type_url::CLUSTER_LOAD_ASSIGNMENT => cfg.load_assignments.push(decode(any)?),
                other => return Err(format!("unknown type {other}")),
            }
        }
    }
    Ok(cfg)
}

fn nack(message: String) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: 3, // INVALID_ARGUMENT
        message,
        details: vec![],
    })
}

/// Runs forever: connect, subscribe, apply, reconnect.
pub async fn run(proxy: Arc<Proxy>, opts: XdsOptions) {
    let mut applied = Applied::default();
    let mut reconnect = Reconnect::new(opts.addresses.clone());
    loop {
        let Some(address) = reconnect.address() else {
            tracing::error!("no xDS address");
            return;
        };
        let got_response = if opts.delta {
            delta_session(&proxy, &opts, &address, &mut applied).await
        } else {
            sotw_session(&proxy, &opts, &address, &mut applied).await
        };
        if let Err((_, e)) = &got_response {
            tracing::warn!(%address, error = %e, "xDS stream ended; serving the last applied config");
        }
        let got = matches!(got_response, Ok(true) | Err((true, _)));
        tokio::time::sleep(reconnect.wait(got)).await;
    }
}

type SessionResult = Result<bool, (bool, String)>;

async fn connect(
    address: &str,
    tls: Option<&XdsTls>,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, String> {
    if address.starts_with("https://") {
        let tls = tls.ok_or_else(|| format!("{address}: TLS needs --ca-root-cert"))?;
        let roots = crate::tls::source::roots_file(&tls.root_cert)?;
        let channel =
            crate::tls::ca::channel(address, &tls.server_name, roots, Some(&tls.store)).await?;
        return Ok(AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024));
    }
    let endpoint = tonic::transport::Endpoint::from_shared(address.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    Ok(AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// Once the set is complete (every type has reached `version`, or the
/// server marked the end of a delta push with [`PUSH_END`]), applies the
/// staged resources: keeps them on success, drops them on failure.
/// None: not complete yet; Some(None): ACK; Some(Some(e)): NACK.
fn settle(
    proxy: &Proxy,
    applied: &mut Applied,
    staged: &mut BTreeMap<String, TypeState>,
    pending: &BTreeMap<String, (String, String)>,
    version: &str,
    push_end: bool,
) -> Option<Option<String>> {
    // Complete: every type arrived at this version (a first push, and state
    // of the world), or the control service marked the end of a delta push
    // that carried only the types that changed.
    // Never in the middle of a chunked type (its nonce ends in MORE; the
    // control service sends types in order, so this matters when the last
    // type of a push is chunked).
    let chunking = pending.values().any(|(nonce, _)| nonce.ends_with(MORE));
    let complete = type_url::ALL
        .iter()
        .all(|t| pending.get(*t).is_some_and(|(_, v)| v == version))
        || (push_end && type_url::ALL.iter().all(|t| staged.contains_key(*t)));
    if chunking || !complete {
        return None;
    }
    let error = try_apply(proxy, staged, version);
    match &error {
        None => applied.by_type = staged.clone(),
        Some(e) => {
            tracing::error!(%version, error = %e, "NACK: config refused, keeping the last good config");
            *staged = applied.by_type.clone();
        }
    }
    Some(error)
}

/// Applies a complete set unless it is already the running version; the
/// error, if it is refused.
fn try_apply(proxy: &Proxy, staged: &BTreeMap<String, TypeState>, version: &str) -> Option<String> {
    if proxy.version() == version {
        return None;
    }
    let result =
        assemble(staged, version).and_then(|cfg| proxy.apply(cfg).map_err(|e| e.to_string()));
    result.err()
}

async fn delta_session(
    proxy: &Proxy,
    opts: &XdsOptions,
    address: &str,
    applied: &mut Applied,
) -> SessionResult {
    let mut client = connect(address, opts.tls.as_ref())
        .await
        .map_err(|e| (false, e))?;
    let (tx, rx) = mpsc::channel(16);
    for t in type_url::ALL {
        let initial = applied
            .by_type
            .get(t)
            .map(|m| m.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect())
            .unwrap_or_default();
        let _ = tx
            .send(DeltaDiscoveryRequest {
                node: Some(opts.node.clone()),
                type_url: t.to_string(),
                initial_resource_versions: initial,
                ..Default::default()
            })
            .await;
    }
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| (false, e.to_string()))?
        .into_inner();
    let mut got = false;
    let mut staged = applied.by_type.clone();
    // type → (nonce, system version) of responses not yet ACKed.
    let mut pending: BTreeMap<String, (String, String)> = BTreeMap::new();
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(got),
            Err(e) => return Err((got, e.to_string())),
        };
        got = true;
        let entry = staged.entry(resp.type_url.clone()).or_default();
        for r in &resp.resources {
            if let Some(any) = &r.resource {
                entry.insert(r.name.clone(), (r.version.clone(), any.clone()));
            }
        }
        for name in &resp.removed_resources {
            entry.remove(name);
        }
        pending.insert(
            resp.type_url.clone(),
            (resp.nonce.clone(), resp.system_version_info.clone()),
        );
        let Some(error) = settle(
            proxy,
            applied,
            &mut staged,
            &pending,
            &resp.system_version_info,
            resp.nonce.ends_with(PUSH_END),
        ) else {
            continue;
        };
        for (t, (nonce, _)) in std::mem::take(&mut pending) {
            let msg = DeltaDiscoveryRequest {
                node: None,
                type_url: t,
                response_nonce: nonce,
                error_detail: error.clone().and_then(nack),
                ..Default::default()
            };
            if tx.send(msg).await.is_err() {
                return Err((got, "stream closed".into()));
            }
        }
    }
}

async fn sotw_session(
    proxy: &Proxy,
    opts: &XdsOptions,
    address: &str,
    applied: &mut Applied,
) -> SessionResult {
    let mut client = connect(address, opts.tls.as_ref())
        .await
        .map_err(|e| (false, e))?;
    let (tx, rx) = mpsc::channel(16);
    for t in type_url::ALL {
        let _ = tx
            .send(DiscoveryRequest {
                version_info: proxy.version(),
                node: Some(opts.node.clone()),
                type_url: t.to_string(),
                ..Default::default()
            })
            .await;
    }
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| (false, e.to_string()))?
        .into_inner();
    let mut got = false;
    let mut staged = applied.by_type.clone();
    let mut pending: BTreeMap<String, (String, String)> = BTreeMap::new();
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(got),
            Err(e) => return Err((got, e.to_string())),
        };
        got = true;
        let mut m = TypeState::new();
        for (i, any) in resp.resources.iter().enumerate() {
            let name = resource_name(&resp.type_url, any).unwrap_or_else(|| i.to_string());
            m.insert(name, (resp.version_info.clone(), any.clone()));
        }
        staged.insert(resp.type_url.clone(), m);
        pending.insert(
            resp.type_url.clone(),
            (resp.nonce.clone(), resp.version_info.clone()),
        );
        let Some(error) = settle(
            proxy,
            applied,
            &mut staged,
            &pending,
            &resp.version_info,
            false,
        ) else {
            continue;
        };
        let acked = proxy.version();
        for (t, (nonce, _)) in std::mem::take(&mut pending) {
            let msg = DiscoveryRequest {
                version_info: acked.clone(),
                node: None,
                resource_names: vec![],
                type_url: t,
                response_nonce: nonce,
                error_detail: error.clone().and_then(nack),
            };
            if tx.send(msg).await.is_err() {
                return Err((got, "stream closed".into()));
            }
        }
    }
}

fn resource_name(t: &str, any: &Any) -> Option<String> {
    Some(match t {
        type_url::LISTENER => decode::<pb::Listener>(any).ok()?.name,
        type_url::ROUTE_CONFIGURATION => decode::<pb::RouteConfiguration>(any).ok()?.name,
        type_url::CLUSTER => decode::<pb::Cluster>(any).ok()?.name,
        type_url::CLUSTER_LOAD_ASSIGNMENT => decode::<pb::ClusterLoadAssignment>(any).ok()?.cluster,
        _ => return None,
    })
}
