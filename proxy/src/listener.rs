//! Listener sockets: bound before a snapshot is swapped in (a port that cannot
//! be bound rejects the config), kept across snapshots while their address
//! stays, closed when a snapshot drops them. Each accepted connection reads
//! the current snapshot to learn whether it is HTTP or TCP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use crate::Shared;
use crate::config::{ListenerKind, RejectError, Snapshot};

#[derive(Default)]
pub struct Listeners {
    running: Mutex<HashMap<SocketAddr, JoinHandle<()>>>,
}

pub struct Bound(Vec<(SocketAddr, TcpListener)>);

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Listeners {
    /// Binds every listener of `snap` that is not open yet.
    pub fn prepare(&self, snap: &Snapshot) -> Result<Bound, RejectError> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut bound = Vec::new();
        for (addr, l) in &snap.listeners {
            if running.contains_key(addr) {
                continue;
            }
            let sock = bind(*addr).map_err(|e| RejectError {
                resource: format!("Listener/{}", l.name),
                field: "address".into(),
                message: format!("cannot listen on {addr}: {e}"),
            })?;
            bound.push((*addr, sock));
        }
        Ok(Bound(bound))
    }

    /// Starts the newly bound listeners and closes those `snap` no longer has.
    pub fn commit(&self, shared: &Arc<Shared>, bound: Bound, snap: &Snapshot) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|addr, task| {
            let keep = snap.listeners.contains_key(addr);
            if !keep {
                tracing::info!(%addr, "listener closed");
                task.abort();
            }
            keep
        });
        for (addr, sock) in bound.0 {
            tracing::info!(%addr, "listening");
            let task = tokio::spawn(accept_loop(shared.clone(), sock, addr));
            running.insert(addr, task);
        }
    }

    pub fn addresses(&self) -> Vec<SocketAddr> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.keys().copied().collect()
    }
}

async fn accept_loop(shared: Arc<Shared>, sock: TcpListener, addr: SocketAddr) {
    loop {
        let (stream, peer) = match sock.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared
            .metrics
            .downstream_connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snap = shared.snapshot.load_full();
        let Some(l) = snap.listeners.get(&addr) else {
            continue;
        };
        match l.kind {
            ListenerKind::Http { .. } => {
                drop(snap);
                tokio::spawn(crate::http::serve_connection(
                    shared.clone(),
                    stream,
                    peer,
                    addr,
                ));
            }
            ListenerKind::Tcp { .. } => {
                tokio::spawn(crate::tcp::serve_connection(
                    shared.clone(),
                    snap,
                    stream,
                    peer,
                    addr,
                ));
            }
        }
    }
}
