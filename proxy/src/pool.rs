//! Upstream connection pools, keyed by endpoint *and* what the connection
//! carries ([`PoolKey`]), never by address alone. A snapshot's endpoint
//! holds its pool, so a request finds it without a lookup; pools outlive
//! snapshots (a config swap keeps warm connections) and go when no snapshot
//! names them.
//!
//! HTTP/1.1: idle keep-alive connections driven in the request's own task
//! ([`crate::h1`]). HTTP/2: one multiplexed connection per key (hyper's
//! client connection, its driver a task of its own), replaced when it closes
//! or has been idle too long.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::connect::{Stream, Transport, connect};
use crate::error::{ConnectError, ForwardError};
use crate::http::body::ReqBody;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    pub transport: Transport,
}

/// Timeouts every pool shares.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    pub connect_timeout: Duration,
    /// How long an unused connection is kept.
    pub idle_timeout: Duration,
}

pub struct Pool {
    pub key: PoolKey,
    opts: PoolOptions,
    pub h1: Arc<crate::h1::Idle<Stream>>,
    h2: Mutex<Option<(http2::SendRequest<ReqBody>, Instant)>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({:?}, {:?})", self.key, self.h1)
    }
}

impl Pool {
    fn new(key: PoolKey, opts: PoolOptions) -> Self {
        Pool {
            key,
            opts,
            h1: Arc::new(crate::h1::Idle::new(opts.idle_timeout)),
            h2: Mutex::new(None),
        }
    }

    /// A new connection for this key.
    pub async fn connect(&self) -> Result<Stream, ConnectError> {
        connect(
            self.key.addr,
            &self.key.transport,
            self.opts.connect_timeout,
        )
        .await
    }

    /// The key's HTTP/2 connection, opened if there is none usable.
    pub async fn h2(&self) -> Result<http2::SendRequest<ReqBody>, ForwardError> {
        {
            let mut slot = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((tx, used)) = slot.as_mut() {
                if !tx.is_closed() && used.elapsed() < self.opts.idle_timeout {
                    *used = Instant::now();
                    return Ok(tx.clone());
                }
                *slot = None;
            }
        }
        let stream = self.connect().await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await?;
        let addr = self.key.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream h2 connection ended");
            }
        });
        let mut slot = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some((tx.clone(), Instant::now()));
        Ok(tx)
    }
}

/// Every pool, by key; shared by all snapshots.
#[derive(Debug)]
pub struct Pools {
    opts: PoolOptions,
    pools: Mutex<HashMap<PoolKey, Weak<Pool>>>,
}

impl Pools {
    pub fn new(opts: PoolOptions) -> Self {
        Pools {
            opts,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// The pool for `key` (the same one while any snapshot holds it).
    pub fn get(&self, key: PoolKey) -> Arc<Pool> {
        let mut map = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.get(&key).and_then(Weak::upgrade) {
            return p;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let p = Arc::new(Pool::new(key.clone(), self.opts));
        map.insert(key, Arc::downgrade(&p));
        p
    }
}
