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
use crate::tls::Alpn;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    pub transport: Transport,
    /// Clusters with different `connectionPool` settings never share connections.
    pub opts: PoolOptions,
}

/// How connections are made and reused: the proxy's flags, overridden per
/// cluster by DestinationRule `connectionPool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolOptions {
    pub connect_timeout: Duration,
    /// How long an unused connection is kept.
    pub idle_timeout: Duration,
    /// Requests per connection (`maxRequestsPerConnection`); 0: no limit.
    pub max_requests: u32,
    /// `maxConnectionDuration`.
    pub max_age: Option<Duration>,
    /// `tcpKeepalive`.
    pub keepalive: Option<Keepalive>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Keepalive {
    /// Zero: the kernel's default, for each.
    pub time: Duration,
    pub interval: Duration,
    pub probes: u32,
}

impl PoolOptions {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        PoolOptions {
            connect_timeout,
            idle_timeout,
            max_requests: 0,
            max_age: None,
            keepalive: None,
        }
    }
}

/// The HTTP/2 connection of a key: its sender, when it was last used and
/// opened, and how many requests it carried.
struct H2Conn {
    tx: http2::SendRequest<ReqBody>,
    used: Instant,
    opened: Instant,
    requests: u32,
}

/// One key's connections, kept per worker: a connection is used only by
/// the worker that opened it (its socket belongs to that worker's event
/// loop), so workers never wake each other and each lock is uncontended.
pub struct Pool {
    pub key: PoolKey,
    opts: PoolOptions,
    h1: Vec<Arc<crate::h1::Idle<Stream>>>,
    h2: Vec<Mutex<Option<H2Conn>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({:?})", self.key)
    }
}

impl Pool {
    fn new(key: PoolKey, opts: PoolOptions, workers: usize) -> Self {
        let workers = workers.max(1);
        Pool {
            key,
            opts,
            h1: (0..workers)
                .map(|_| {
                    Arc::new(crate::h1::Idle::new(crate::h1::Reuse {
                        idle_timeout: opts.idle_timeout,
                        max_requests: opts.max_requests,
                        max_age: opts.max_age,
                    }))
                })
                .collect(),
            h2: (0..workers).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// This worker's slot (the main thread and a single worker: the first).
    fn slot(&self) -> usize {
        crate::workers::slot(self.h1.len())
    }

    /// This worker's idle HTTP/1.1 connections.
    pub fn h1(&self) -> &Arc<crate::h1::Idle<Stream>> {
        &self.h1[self.slot()]
    }

    /// A new connection for this key, to carry `alpn`.
    pub async fn connect(&self, alpn: Alpn) -> Result<Stream, ConnectError> {
        connect(
            self.key.addr,
            &self.key.transport,
            self.opts.connect_timeout,
            self.opts.keepalive.as_ref(),
            alpn,
        )
        .await
    }

    /// The key's HTTP/2 connection, opened if there is none usable.
    pub async fn h2(&self) -> Result<http2::SendRequest<ReqBody>, ForwardError> {
        let mine = &self.h2[self.slot()];
        {
            let mut slot = mine.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = slot.as_mut() {
                let o = &self.opts;
                if !c.tx.is_closed()
                    && c.used.elapsed() < o.idle_timeout
                    && (o.max_requests == 0 || c.requests < o.max_requests)
                    && o.max_age.is_none_or(|a| c.opened.elapsed() < a)
                {
                    c.used = Instant::now();
                    c.requests += 1;
                    return Ok(c.tx.clone());
                }
                // Dropping the sender lets its requests finish, then the
                // connection closes.
                *slot = None;
            }
        }
        let stream = self.connect(Alpn::H2).await?;
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
        let mut slot = mine.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        *slot = Some(H2Conn {
            tx: tx.clone(),
            used: now,
            opened: now,
            requests: 1,
        });
        Ok(tx)
    }
}

/// Every pool, by key; shared by all snapshots.
#[derive(Debug)]
pub struct Pools {
    opts: PoolOptions,
    pools: Mutex<HashMap<PoolKey, Weak<Pool>>>,
    /// Connection slots per pool: one per worker.
    workers: usize,
}

impl Pools {
    pub fn new(opts: PoolOptions) -> Self {
        Pools::per_worker(opts, 1)
    }

    /// Pools whose connections are kept per worker (`workers` of them).
    pub fn per_worker(opts: PoolOptions, workers: usize) -> Self {
        Pools {
            opts,
            pools: Mutex::new(HashMap::new()),
            workers,
        }
    }

    /// The options from the proxy's flags, before a cluster's overrides.
    pub fn defaults(&self) -> PoolOptions {
        self.opts
    }

    /// The pool for `key` (the same one while any snapshot holds it).
    pub fn get(&self, key: PoolKey) -> Arc<Pool> {
        let mut map = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.get(&key).and_then(Weak::upgrade) {
            return p;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let p = Arc::new(Pool::new(key.clone(), key.opts, self.workers));
        map.insert(key, Arc::downgrade(&p));
        p
    }
}
