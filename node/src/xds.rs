//! Node mode over xDS: a delta ADS subscription to `NodeService`
//! resources from the control service. Each response is applied whole (a
//! resource that does not decode NACKs the response, and the rules in place
//! stay); the stream reconnects with backoff and jitter, moving to the next
//! address, and resumes with the versions it has.

use std::collections::BTreeMap;
use std::time::Duration;

use bosun_xds_proto::config as pb;
use bosun_xds_proto::core::Node;
use bosun_xds_proto::discovery::DeltaDiscoveryRequest;
use bosun_xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use bosun_xds_proto::prost::Message;
use bosun_xds_proto::prost_types::{Struct, Value, value::Kind};
use bosun_xds_proto::rpc::Status as RpcStatus;
use bosun_xds_proto::{MORE, Reconnect, type_url};
use tokio::sync::mpsc;

use crate::services::{ServiceMap, ServicePort, from_proto};

/// Where to subscribe and who this node is.
#[derive(Clone, Debug)]
pub struct XdsOptions {
    /// `host:port` of each control replica, tried in turn.
    pub addresses: Vec<String>,
    pub node_id: String,
    pub node_name: String,
}

fn node(opts: &XdsOptions) -> Node {
    let mut fields = BTreeMap::new();
    fields.insert(
        "MODE".to_string(),
        Value {
            kind: Some(Kind::StringValue("node".into())),
        },
    );
    fields.insert(
        "NODE_NAME".to_string(),
        Value {
            kind: Some(Kind::StringValue(opts.node_name.clone())),
        },
    );
    Node {
        id: opts.node_id.clone(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

/// Subscribes and sends the node's service map each time it changes.
pub fn watch(opts: XdsOptions) -> mpsc::Receiver<ServiceMap> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        // name → (version, service port): what this node holds.
        let mut held = Held::new();
        let mut reconnect = Reconnect::new(opts.addresses.clone());
        loop {
            let Some(address) = reconnect.address() else {
                tracing::error!("no xDS address");
                return;
            };
            let got_response = match session(&opts, &address, &mut held, &tx).await {
                Ok(()) => return, // the receiver is gone: shutting down
                Err((got_response, e)) => {
                    tracing::warn!(%address, error = %e, "xDS stream ended; the rules in place stay");
                    got_response
                }
            };
            tokio::time::sleep(reconnect.wait(got_response)).await;
        }
    });
    rx
}

/// The node's services as received: name → (version, service port).
type Held = BTreeMap<String, (String, std::sync::Arc<ServicePort>)>;

/// One stream. Err((whether a response came, why it ended)).
async fn session(
    opts: &XdsOptions,
    address: &str,
    held: &mut Held,
    out: &mpsc::Sender<ServiceMap>,
) -> Result<(), (bool, String)> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| (false, e.to_string()))?
        .connect_timeout(Duration::from_secs(2));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| (false, format!("connect: {e}")))?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let (req_tx, req_rx) = mpsc::channel::<DeltaDiscoveryRequest>(8);
    let initial: BTreeMap<String, String> = held
        .iter()
        .map(|(name, (version, _))| (name.clone(), version.clone()))
        .collect();
    req_tx
        .send(DeltaDiscoveryRequest {
            node: Some(node(opts)),
            type_url: type_url::NODE_SERVICE.into(),
            initial_resource_versions: initial,
            ..Default::default()
        })
        .await
        .map_err(|_| (false, "request channel closed".to_string()))?;
    let mut inbound = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .map_err(|e| (false, e.to_string()))?
        .into_inner();
    let mut got = false;
    // A chunked update (nonces ending in MORE until its last chunk) is
    // gathered whole, then programmed or, if any chunk was bad, refused
    // whole with a NACK of its last chunk.
    let mut gathering: Option<(Held, Option<String>)> = None;
    loop {
        let resp = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err((got, "stream closed".into())),
            Err(e) => return Err((got, e.to_string())),
        };
        got = true;
        let (mut next, mut error) = gathering.take().unwrap_or_else(|| (held.clone(), None));
        // After a bad chunk the rest of the update is only ACKed, not read.
        let resources = if error.is_none() {
            &resp.resources[..]
        } else {
            &[]
        };
        for r in resources {
            let decoded = r
                .resource
                .as_ref()
                .ok_or_else(|| format!("{}: no resource", r.name))
                .and_then(|any| {
                    pb::NodeService::decode(any.value.as_ref())
                        .map_err(|e| format!("{}: cannot decode: {e}", r.name))
                })
                .and_then(|m| from_proto(&m, &opts.node_name));
            match decoded {
                Ok(sp) => {
                    next.insert(r.name.clone(), (r.version.clone(), std::sync::Arc::new(sp)));
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if error.is_none() {
            for name in &resp.removed_resources {
                next.remove(name);
            }
        }
        let error_detail = if resp.nonce.ends_with(MORE) {
            gathering = Some((next, error));
            None
        } else {
            match error {
                Some(message) => {
                    tracing::warn!(error = %message, "NACK: the rules in place stay");
                    Some(RpcStatus {
                        code: 3,
                        message,
                        details: vec![],
                    })
                }
                None => {
                    let changed = next.len() != held.len()
                        || next
                            .iter()
                            .zip(held.iter())
                            .any(|(a, b)| a.0 != b.0 || a.1.0 != b.1.0);
                    *held = next;
                    if changed {
                        let map: ServiceMap = held
                            .values()
                            .map(|(_, sp)| (sp.id.clone(), sp.clone()))
                            .collect();
                        if out.send(map).await.is_err() {
                            return Ok(());
                        }
                    }
                    None
                }
            }
        };
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail,
            ..Default::default()
        };
        if req_tx.send(ack).await.is_err() {
            return Err((got, "request channel closed".into()));
        }
    }
}
