//! Opaque TCP: pick a cluster by weight and an endpoint by the cluster's
//! policy, connect, and copy bytes both ways until either side closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::Shared;
use crate::cluster::{HashKey, hash_bytes};
use crate::config::{ListenerKind, Snapshot};

pub async fn serve_connection(
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    mut down: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let Some(listener) = snap.listeners.get(&local) else {
        return;
    };
    let ListenerKind::Tcp { route: Some(route) } = &listener.kind else {
        tracing::debug!(%local, "no TCP route; closing");
        return;
    };
    let cluster = route.pick();
    let key = matches!(cluster.hash, Some(HashKey::SourceIp))
        .then(|| hash_bytes(peer.ip().to_string().as_bytes()));
    let Some(endpoint) = cluster.pick(key).cloned() else {
        shared
            .metrics
            .tcp_closed(&cluster.no_endpoint_labels, "UH", 0, 0);
        return;
    };
    drop(snap);
    endpoint
        .stats
        .active
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let labels = endpoint.labels.clone();
    let connected =
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(endpoint.addr)).await;
    let mut up = match connected {
        Ok(Ok(s)) => s,
        _ => {
            endpoint
                .stats
                .active
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            shared.metrics.tcp_closed(&labels, "UF", 0, 0);
            return;
        }
    };
    let _ = up.set_nodelay(true);
    shared.metrics.tcp_opened(&labels);
    let (flags, received, sent) = match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((from_client, to_client)) => ("-", from_client, to_client),
        Err(_) => ("UC", 0, 0),
    };
    endpoint
        .stats
        .active
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    shared.metrics.tcp_closed(&labels, flags, sent, received);
}
