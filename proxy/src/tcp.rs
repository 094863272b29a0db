//! Opaque TCP: pick a cluster by weight and an endpoint by the cluster's
//! policy, connect through the one connector, and copy bytes both ways
//! until either side closes. A drain lets the copy run to the end of the
//! drain window.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::Shared;
use crate::cluster::{Cluster, HashKey, hash_bytes};
use crate::config::{ListenerKind, Snapshot};
use crate::drain::Tracked;
use crate::flags::Flags;
use crate::http::body::ActiveGuard;
use crate::outlier::Outcome;

pub async fn serve_connection(
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    down: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    _tracked: Tracked,
) {
    let Some(listener) = snap.listeners.get(&local) else {
        return;
    };
    let ListenerKind::Tcp { route: Some(route) } = &listener.kind else {
        tracing::debug!(%local, "no TCP route; closing");
        return;
    };
    let cluster = route.pick_with(&mut rand::rng()).clone();
    drop(snap);
    let Some(cluster) = shared.resolve_cluster(&cluster, None) else {
        return;
    };
    proxy(shared, cluster, down, peer, None).await
}

/// Copies `down` to an endpoint of `cluster` and back (a TCP listener's
/// connection, a gateway's PASSTHROUGH or terminated TLS, a captured
/// connection). `only`: to that endpoint of the cluster if it has it (a
/// client that dialled an endpoint's own address).
pub async fn proxy<S>(
    shared: Arc<Shared>,
    cluster: Arc<Cluster>,
    mut down: S,
    peer: SocketAddr,
    only: Option<SocketAddr>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let key = matches!(cluster.hash, Some(HashKey::SourceIp))
        .then(|| hash_bytes(peer.ip().to_string().as_bytes()));
    let pinned = only.and_then(|a| cluster.endpoints.iter().position(|e| e.addr == a));
    let Some(idx) = pinned.or_else(|| cluster.pick(key, &[])) else {
        shared
            .metrics
            .tcp_closed(&cluster.no_endpoint_labels, Flags::NoHealthyUpstream, 0, 0);
        return;
    };
    // connectionPool.tcp.maxConnections: over it the connection is closed (UO).
    let slot = match &cluster.conn_slots {
        None => None,
        Some(s) => match s.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                shared.metrics.tcp_closed(
                    &cluster.no_endpoint_labels,
                    Flags::UpstreamOverflow,
                    0,
                    0,
                );
                return;
            }
        },
    };
    let endpoint = cluster.endpoints[idx].clone();
    let _active = ActiveGuard::with_cluster(&endpoint, &cluster.state, slot);
    let labels = endpoint.labels.clone();
    let mut up = match endpoint.pool.connect(crate::tls::Alpn::Tcp).await {
        Ok(s) => {
            cluster.report(idx, Outcome::Status(200));
            s
        }
        Err(e) => {
            cluster.report(idx, Outcome::LocalFailure);
            tracing::debug!(endpoint = %endpoint.addr, error = %e, "TCP upstream connect failed");
            shared
                .metrics
                .tcp_closed(&labels, Flags::UpstreamConnectFailure, 0, 0);
            return;
        }
    };
    shared.metrics.tcp_opened(&labels);
    let (flags, received, sent) = match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((from_client, to_client)) => (Flags::None, from_client, to_client),
        Err(_) => (Flags::UpstreamConnectionTermination, 0, 0),
    };
    shared.metrics.tcp_closed(&labels, flags, sent, received);
}
