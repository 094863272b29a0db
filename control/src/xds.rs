//! The aggregated discovery service: Envoy's ADS protocol (state of the
//! world and incremental), carrying Bosun's `bosun.config.v1` resources.
//!
//! Each stream identifies its proxy by the `Node` of its first request; the
//! node's metadata (MODE, NAMESPACE, LABELS, addresses) picks what the proxy
//! receives. A push sends its types in dependency order (clusters,
//! endpoints, listeners, routes), each stamped with the same global version,
//! so a proxy applies a consistent set. State of the world sends all four;
//! delta sends only the types that changed, and the last response of the
//! push has a nonce ending in [`PUSH_END`], which tells a Bosun proxy the
//! set is complete (to any other client a nonce is opaque).
//! Versions are content hashes: two replicas fed the same config agree.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bosun_xds_proto::Any;
use bosun_xds_proto::config as pb;
use bosun_xds_proto::core::Node;
use bosun_xds_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use bosun_xds_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use bosun_xds_proto::prost::Message;
use bosun_xds_proto::prost_types::{Struct, value::Kind};
use bosun_xds_proto::{CHUNK_BYTES, MORE, PUSH_END, type_url};
use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::model::Labels;
use crate::translate::{Prepared, ProxyMode, ProxyParams};

/// One named, versioned resource of one type.
#[derive(Clone, Debug)]
pub struct Named {
    pub version: String,
    pub any: Any,
}

/// One type's resources by name; shared between versions where they are
/// the same (an endpoint update shares all but the endpoints).
pub type TypeMap = Arc<BTreeMap<String, Named>>;

/// A proxy's resources by type URL, then by name, and the global version.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub version: String,
    pub by_type: BTreeMap<&'static str, TypeMap>,
}

fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn named<M: Message>(type_url: &str, m: &M) -> Named {
    let value = m.encode_to_vec();
    Named {
        version: fnv(&value),
        any: Any {
            type_url: type_url.to_string(),
            value: value.into(),
        },
    }
}

/// Splits a proxy's config into xDS resources.
pub fn split(cfg: &pb::ProxyConfig) -> Resources {
    let mut by_type: BTreeMap<&'static str, BTreeMap<String, Named>> = BTreeMap::new();
    for t in type_url::ALL {
        by_type.insert(t, BTreeMap::new());
    }
    let mut put = |t: &'static str, name: &str, n: Named| {
        if let Some(m) = by_type.get_mut(t) {
            m.insert(name.to_string(), n);
        }
    };
    for l in &cfg.listeners {
        put(type_url::LISTENER, &l.name, named(type_url::LISTENER, l));
    }
    for r in &cfg.route_configurations {
        put(
            type_url::ROUTE_CONFIGURATION,
            &r.name,
            named(type_url::ROUTE_CONFIGURATION, r),
        );
    }
    for c in &cfg.clusters {
        put(type_url::CLUSTER, &c.name, named(type_url::CLUSTER, c));
    }
    for a in &cfg.load_assignments {
        put(
            type_url::CLUSTER_LOAD_ASSIGNMENT,
            &a.cluster,
            named(type_url::CLUSTER_LOAD_ASSIGNMENT, a),
        );
    }
    versioned(by_type.into_iter().map(|(t, m)| (t, Arc::new(m))).collect())
}

/// `old` (the resources of a proxy of `params` for the config `cfg` was
/// prepared from) with the endpoints of `hosts` taken from `cfg`: an
/// endpoint update touches one type and only those hosts' clusters.
fn patch(
    old: &Resources,
    cfg: &Prepared,
    params: &ProxyParams,
    hosts: &HashSet<String>,
) -> Resources {
    let mut by_type = old.by_type.clone();
    if let Some(m) = by_type.get_mut(type_url::CLUSTER_LOAD_ASSIGNMENT) {
        let mut next = None;
        for name in m.keys() {
            if crate::translate::cluster_host(name).is_some_and(|h| hosts.contains(h))
                && let Some(a) = cfg.assignment(params, name)
            {
                next.get_or_insert_with(|| (**m).clone())
                    .insert(name.clone(), named(type_url::CLUSTER_LOAD_ASSIGNMENT, &a));
            }
        }
        if let Some(n) = next {
            *m = Arc::new(n);
        }
    }
    versioned(by_type)
}

/// Resources with their version: a hash of every resource's (type, name,
/// version), deterministic, so replicas agree, and no second encoding.
fn versioned(by_type: BTreeMap<&'static str, TypeMap>) -> Resources {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (t, m) in &by_type {
        for (name, n) in m.iter() {
            for part in [t.as_bytes(), name.as_bytes(), n.version.as_bytes()] {
                for b in part.iter().chain([0u8].iter()) {
                    h ^= u64::from(*b);
                    h = h.wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
    }
    Resources {
        version: format!("{h:016x}"),
        by_type,
    }
}

/// What a node (node mode) receives: one `NodeService` per service port.
fn node_resources(cfg: &crate::model::Config) -> Result<Arc<Resources>, String> {
    let map = crate::node_services::service_map(cfg, "").map_err(|e| e.to_string())?;
    let mut m = BTreeMap::new();
    for (id, sp) in &map {
        m.insert(
            id.clone(),
            named(type_url::NODE_SERVICE, &crate::node_services::to_proto(sp)),
        );
    }
    let mut by_type = BTreeMap::new();
    by_type.insert(type_url::NODE_SERVICE, Arc::new(m));
    Ok(Arc::new(versioned(by_type)))
}

/// The types a proxy of this mode subscribes to, in push order.
pub fn types_for(mode: ProxyMode) -> &'static [&'static str] {
    const NODE: [&str; 1] = [type_url::NODE_SERVICE];
    match mode {
        ProxyMode::Node => &NODE,
        ProxyMode::Sidecar | ProxyMode::Gateway => &type_url::ALL,
    }
}

/// Node metadata keys a Bosun proxy sends (all optional).
pub mod meta {
    pub const MODE: &str = "MODE";
    pub const NAMESPACE: &str = "NAMESPACE";
    pub const LABELS: &str = "LABELS";
    pub const OUTBOUND_ADDRESS: &str = "OUTBOUND_ADDRESS";
    pub const INBOUND_ADDRESS: &str = "INBOUND_ADDRESS";
    pub const APP_PORT: &str = "APP_PORT";
    pub const GATEWAY_ADDRESS: &str = "GATEWAY_ADDRESS";
    /// Istio's: `REDIRECT` when `bosun capture` sends the pod's traffic here.
    pub const INTERCEPTION_MODE: &str = "INTERCEPTION_MODE";
}

fn meta_str(s: &Struct, key: &str) -> Option<String> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(v) => Some(v.clone()),
        Kind::NumberValue(n) => Some(format!("{n}")),
        _ => None,
    }
}

/// What a proxy is, from its Node.
pub fn params_from_node(node: &Node) -> Result<ProxyParams, String> {
    let mut p = ProxyParams::default();
    let Some(md) = &node.metadata else {
        return Ok(p);
    };
    if let Some(m) = meta_str(md, meta::MODE) {
        p.mode = match m.as_str() {
            "sidecar" => ProxyMode::Sidecar,
            "gateway" => ProxyMode::Gateway,
            "node" => ProxyMode::Node,
            other => {
                return Err(format!(
                    "node metadata MODE {other:?}: want sidecar, gateway or node"
                ));
            }
        };
    }
    if let Some(ns) = meta_str(md, meta::NAMESPACE) {
        p.namespace = ns;
    }
    if let Some(v) = md.fields.get(meta::LABELS)
        && let Some(Kind::StructValue(ls)) = &v.kind
    {
        let mut labels = Labels::new();
        for k in ls.fields.keys() {
            if let Some(val) = meta_str(ls, k) {
                labels.insert(k.clone(), val);
            }
        }
        p.labels = labels;
    } else if p.mode == ProxyMode::Gateway {
        p.labels.insert("istio".into(), "ingressgateway".into());
    }
    let split_addr = |s: &str| -> Result<(String, u32), String> {
        let a: std::net::SocketAddr = s
            .parse()
            .map_err(|_| format!("bad address {s:?} in node metadata"))?;
        Ok((a.ip().to_string(), u32::from(a.port())))
    };
    if let Some(a) = meta_str(md, meta::OUTBOUND_ADDRESS) {
        let (ip, port) = split_addr(&a)?;
        p.outbound_address = ip;
        p.outbound_port = port;
    }
    match meta_str(md, meta::INTERCEPTION_MODE).as_deref() {
        None | Some("NONE") => {}
        Some("REDIRECT") => {
            p.capture = true;
            let inbound =
                meta_str(md, meta::INBOUND_ADDRESS).unwrap_or_else(|| "0.0.0.0:15006".into());
            let (ip, port) = split_addr(&inbound)?;
            p.inbound = Some((ip, port, 0));
        }
        Some(other) => {
            return Err(format!(
                "node metadata INTERCEPTION_MODE {other:?}: want REDIRECT or NONE"
            ));
        }
    }
    if p.capture {
        // The app's ports come from its Services, not APP_PORT.
    } else if let Some(app) = meta_str(md, meta::APP_PORT) {
        let app: u32 = app.parse().map_err(|_| format!("bad APP_PORT {app:?}"))?;
        let inbound = meta_str(md, meta::INBOUND_ADDRESS).unwrap_or_else(|| "0.0.0.0:15006".into());
        let (ip, port) = split_addr(&inbound)?;
        p.inbound = Some((ip, port, app));
    }
    if let Some(g) = meta_str(md, meta::GATEWAY_ADDRESS) {
        p.gateway_address = g;
    }
    Ok(p)
}

/// What `bosun status` shows per connected proxy.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProxyStatus {
    pub node_id: String,
    /// The SPIFFE ID it proved (empty: the plaintext listener).
    pub identity: String,
    pub stream: String,
    pub acked_version: String,
    pub latest_version: String,
    pub last_nack: Option<String>,
    pub translate_error: Option<String>,
}

#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    proxies: Mutex<HashMap<u64, ProxyStatus>>,
}

impl Registry {
    pub fn snapshot(&self) -> Vec<ProxyStatus> {
        let m = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.values().cloned().collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }
    fn update(&self, id: u64, f: impl FnOnce(&mut ProxyStatus)) {
        let mut m = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get_mut(&id) {
            f(s);
        }
    }
}

struct Deregister(Arc<Registry>, u64);

impl Drop for Deregister {
    fn drop(&mut self) {
        let mut m = self.0.proxies.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&self.1);
    }
}

/// Translations shared by every stream of the same kind of proxy: a fleet
/// of identical sidecars costs one translation per config change, and their
/// streams hold the same `Arc`, not copies.
#[derive(Default)]
struct TranslateCache {
    config: Option<Arc<Prepared>>,
    by_params: HashMap<String, Result<Arc<Resources>, String>>,
    /// The translations of the config before, when the current one is an
    /// endpoint update of it: patched instead of translated again.
    previous: HashMap<String, Result<Arc<Resources>, String>>,
}

/// What changed in one type between two versions, computed once and shared.
struct TypeDiff {
    changed: Vec<(String, Named)>,
    removed: Vec<String>,
}

/// Diffs by (old version, new version, type URL).
type DiffCache = HashMap<(String, String, &'static str), Arc<TypeDiff>>;

/// The ADS service, fed by a watch of the last good config.
#[derive(Clone)]
pub struct Ads {
    config: watch::Receiver<Option<Arc<Prepared>>>,
    pub registry: Arc<Registry>,
    translations: Arc<tokio::sync::Mutex<TranslateCache>>,
    diffs: Arc<Mutex<DiffCache>>,
    full_pushes: Arc<tokio::sync::Semaphore>,
    shutdown: watch::Receiver<bool>,
    /// Checks callers on the TLS listener (absent: nothing is checked).
    auth: Option<Arc<crate::identity::Authenticator>>,
    trust_domain: String,
}

/// How many first (full) pushes may be in flight at once.
const MAX_FULL_PUSHES: usize = 64;

impl Ads {
    pub fn new(config: watch::Receiver<Option<Arc<Prepared>>>) -> Ads {
        Ads {
            config,
            registry: Arc::new(Registry::default()),
            translations: Arc::default(),
            diffs: Arc::default(),
            full_pushes: Arc::new(tokio::sync::Semaphore::new(MAX_FULL_PUSHES)),
            shutdown: watch::channel(false).1,
            auth: None,
            trust_domain: "cluster.local".into(),
        }
    }

    /// Callers on the TLS listener must prove an identity; a proxy gets
    /// the config of the namespace it proved, and its node id is bound to
    /// that identity while it is connected.
    pub fn with_auth(mut self, auth: Arc<crate::identity::Authenticator>) -> Ads {
        self.trust_domain = auth.trust_domain.clone();
        self.auth = Some(auth);
        self
    }

    async fn caller<T>(
        &self,
        req: &Request<T>,
    ) -> Result<Option<crate::identity::WorkloadId>, Status> {
        match &self.auth {
            Some(a) => a.authenticate(req).await,
            None => Ok(None),
        }
    }

    /// Streams end with `UNAVAILABLE` once `shutdown` turns true.
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Ads {
        self.shutdown = shutdown;
        self
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Ads> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(64 * 1024 * 1024)
    }

    /// A new stream: who the proxy is (from the Node of its first request),
    /// what it is to receive, and its entry in `bosun status`.
    fn begin(
        &self,
        node: Option<Node>,
        stream: &str,
        caller: Option<&crate::identity::WorkloadId>,
    ) -> Result<(Node, ProxyParams, u64, Deregister), Status> {
        let node = node.unwrap_or_default();
        let mut params = params_from_node(&node).map_err(Status::invalid_argument)?;
        params.trust_domain.clone_from(&self.trust_domain);
        if let Some(c) = caller {
            let says = node
                .metadata
                .as_ref()
                .and_then(|m| meta_str(m, meta::NAMESPACE));
            if says.as_ref().is_some_and(|ns| *ns != c.namespace) {
                return Err(Status::permission_denied(format!(
                    "node metadata NAMESPACE {:?}, but the caller proved {}",
                    says.unwrap_or_default(),
                    c.spiffe()
                )));
            }
            params.namespace.clone_from(&c.namespace);
        }
        let (id, dereg) = self.register(&node, stream, caller)?;
        Ok((node, params, id, dereg))
    }

    fn register(
        &self,
        node: &Node,
        stream: &str,
        caller: Option<&crate::identity::WorkloadId>,
    ) -> Result<(u64, Deregister), Status> {
        let identity = caller.map(|c| c.spiffe()).unwrap_or_default();
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        let mut m = self
            .registry
            .proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A node id is held by the identity that connected with it: another
        // caller cannot stand in for it (and write its status).
        if let Some(other) = m
            .values()
            .find(|s| s.node_id == node.id && s.identity != identity)
        {
            return Err(Status::permission_denied(format!(
                "node id {:?} is connected as {:?}",
                node.id,
                if other.identity.is_empty() {
                    "an unauthenticated proxy"
                } else {
                    &other.identity
                }
            )));
        }
        m.insert(
            id,
            ProxyStatus {
                node_id: node.id.clone(),
                identity,
                stream: stream.into(),
                acked_version: String::new(),
                latest_version: String::new(),
                last_nack: None,
                translate_error: None,
            },
        );
        Ok((id, Deregister(self.registry.clone(), id)))
    }

    /// The proxy's resources for the current config, or why there are none.
    async fn resources_for(
        &self,
        config: &Option<Arc<Prepared>>,
        params: &ProxyParams,
    ) -> Result<Arc<Resources>, String> {
        let Some(cfg) = config else {
            return Err("the control service has no valid config yet".into());
        };
        let key = format!("{params:?}");
        let mut cache = self.translations.lock().await;
        if !cache.config.as_ref().is_some_and(|c| Arc::ptr_eq(c, cfg)) {
            let from = cache.config.as_ref().map(|c| c.id());
            cache.config = Some(cfg.clone());
            cache.previous = if cfg.endpoint_update().map(|u| u.base) == from {
                std::mem::take(&mut cache.by_params)
            } else {
                cache.by_params.clear();
                HashMap::new()
            };
        }
        if let Some(r) = cache.by_params.get(&key) {
            return r.clone();
        }
        if let (Some(update), Some(Ok(old))) = (cfg.endpoint_update(), cache.previous.get(&key))
            && params.mode != ProxyMode::Node
        {
            let t = std::time::Instant::now();
            let r = Ok(Arc::new(patch(old, cfg, params, &update.hosts)));
            tracing::debug!(
                patch_us = t.elapsed().as_micros() as u64,
                hosts = update.hosts.len(),
                "endpoint update for a kind of proxy"
            );
            cache.by_params.insert(key, r.clone());
            return r;
        }
        if params.mode == ProxyMode::Node {
            let r = node_resources(&cfg.config);
            cache.by_params.insert(key, r.clone());
            return r;
        }
        let t = std::time::Instant::now();
        let translated = cfg.translate(params);
        let translate_ms = t.elapsed().as_millis() as u64;
        let r = translated
            .map(|c| Arc::new(split(&c)))
            .map_err(|e| e.to_string());
        tracing::debug!(
            translate_ms,
            split_ms = t.elapsed().as_millis() as u64 - translate_ms,
            "translated for a kind of proxy"
        );
        cache.by_params.insert(key, r.clone());
        r
    }

    async fn current(
        &self,
        id: u64,
        cfg_rx: &mut watch::Receiver<Option<Arc<Prepared>>>,
        params: &ProxyParams,
    ) -> Option<Arc<Resources>> {
        let cfg = cfg_rx.borrow_and_update().clone();
        match self.resources_for(&cfg, params).await {
            Ok(r) => {
                let v = r.version.clone();
                self.registry.update(id, |s| {
                    s.latest_version = v;
                    s.translate_error = None;
                });
                Some(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no config for this proxy; it keeps its last good one");
                self.registry.update(id, |s| s.translate_error = Some(e));
                None
            }
        }
    }

    fn diff(&self, old: &Resources, new: &Resources, t: &'static str) -> Arc<TypeDiff> {
        let key = (old.version.clone(), new.version.clone(), t);
        if let Some(d) = self
            .diffs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return d.clone();
        }
        let empty = TypeMap::default();
        let (o, n) = (
            old.by_type.get(t).unwrap_or(&empty),
            new.by_type.get(t).unwrap_or(&empty),
        );
        if Arc::ptr_eq(o, n) {
            return Arc::new(TypeDiff {
                changed: Vec::new(),
                removed: Vec::new(),
            });
        }
        let d = Arc::new(TypeDiff {
            changed: n
                .iter()
                .filter(|(name, r)| o.get(*name).is_none_or(|x| x.version != r.version))
                .map(|(name, r)| (name.clone(), r.clone()))
                .collect(),
            removed: o
                .keys()
                .filter(|name| !n.contains_key(*name))
                .cloned()
                .collect(),
        });
        let mut diffs = self.diffs.lock().unwrap_or_else(|p| p.into_inner());
        if diffs.len() > 256 {
            diffs.clear();
        }
        diffs.insert(key, d.clone());
        d
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs one ADS stream in its own task; responses go out through `tx`, and
/// an error ends the stream with its status.
/// A shutdown of the control service ends the stream with `UNAVAILABLE`, so
/// the proxy moves to another replica at once.
fn serve_stream<T, F, Fut>(mut shutdown: watch::Receiver<bool>, run: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    let fut = run(tx.clone());
    tokio::spawn(async move {
        let result = tokio::select! {
            r = fut => r,
            _ = async {
                // No sender (no shutdown wired): never.
                if shutdown.wait_for(|s| *s).await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => Err(Status::unavailable("control service shutting down")),
        };
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    });
    Box::pin(YieldEach {
        inner: ReceiverStream::new(rx),
        yielded: false,
    })
}

/// Yields to the runtime after each message: tonic encodes queued messages
/// into one buffer until it holds 32 KiB, and a stream keeps its encode
/// buffer at the largest size it reached, so with thousands of streams,
/// one message (one chunk) per buffer is what bounds the memory.
struct YieldEach<S> {
    inner: S,
    yielded: bool,
}

impl<S: Stream + Unpin> Stream for YieldEach<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let item = Pin::new(&mut self.inner).poll_next(cx);
        if item.is_ready() {
            self.yielded = false;
        }
        item
    }
}

fn nack_text(s: &bosun_xds_proto::rpc::Status) -> String {
    format!("code {}: {}", s.code, s.message)
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let caller = self.caller(&request).await?;
        let mut inbound = Requests::new(request.into_inner());
        let this = self.clone();
        Ok(Response::new(serve_stream(
            self.shutdown.clone(),
            move |tx| async move { this.sotw(&mut inbound, &tx, caller).await },
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let caller = self.caller(&request).await?;
        let mut inbound = Requests::new(request.into_inner());
        let this = self.clone();
        Ok(Response::new(serve_stream(
            self.shutdown.clone(),
            move |tx| async move { this.delta(&mut inbound, &tx, caller).await },
        )))
    }
}

/// Requests a stream may queue while its handler waits to send: far more
/// than a client ACKing every chunk of a push has outstanding.
const MAX_BACKLOG: usize = 16 * 1024;

/// A stream's requests. A handler busy sending a large push (hundreds of
/// chunks, each ACKed by clients that ACK every response) keeps reading
/// them while it waits to send, into a backlog: otherwise HTTP/2 flow
/// control stalls both directions (the client blocks on sending ACKs, so it
/// stops reading responses, so the handler blocks on sending).
struct Requests<T> {
    inbound: Streaming<T>,
    backlog: std::collections::VecDeque<Result<T, Status>>,
    ended: bool,
}

impl<T> Requests<T> {
    fn new(inbound: Streaming<T>) -> Requests<T> {
        Requests {
            inbound,
            backlog: Default::default(),
            ended: false,
        }
    }

    /// The next request (cancel safe, as `Streaming::message` is).
    async fn message(&mut self) -> Result<Option<T>, Status> {
        if let Some(m) = self.backlog.pop_front() {
            return m.map(Some);
        }
        if self.ended {
            return Ok(None);
        }
        self.inbound.message().await
    }

    /// Sends `item` on `tx`, reading requests while it waits; false once
    /// the response stream is gone. Past [`MAX_BACKLOG`] waiting requests it
    /// stops reading, and HTTP/2 flow control holds the client back again.
    async fn send<R>(&mut self, tx: &mpsc::Sender<R>, item: R) -> bool {
        let permit = loop {
            tokio::select! {
                biased;
                p = tx.reserve() => break p,
                m = self.inbound.message(), if !self.ended && self.backlog.len() < MAX_BACKLOG => match m {
                    Ok(Some(r)) => self.backlog.push_back(Ok(r)),
                    Ok(None) => self.ended = true,
                    Err(e) => {
                        self.backlog.push_back(Err(e));
                        self.ended = true;
                    }
                },
            }
        };
        match permit {
            Ok(p) => {
                p.send(item);
                true
            }
            Err(_) => false,
        }
    }
}

#[derive(Default)]
struct SotwType {
    /// Empty: wildcard.
    names: Vec<String>,
    nonce: String,
    sent_version: String,
}

#[derive(Default)]
struct DeltaType {
    wildcard: bool,
    names: HashSet<String>,
    /// The resources last sent on this stream (shared with other streams).
    sent: Option<Arc<Resources>>,
    /// On a resumed stream, until the first response: what the client has.
    resumed: Option<HashMap<String, String>>,
    nonce: String,
}

impl Ads {
    async fn sotw(
        &self,
        inbound: &mut Requests<DiscoveryRequest>,
        tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
        caller: Option<crate::identity::WorkloadId>,
    ) -> Result<(), Status> {
        let Some(first) = inbound.message().await? else {
            return Ok(());
        };
        let (node, params, id, _dereg) = self.begin(first.node.clone(), "sotw", caller.as_ref())?;
        let mut cfg_rx = self.config.clone();
        let mut current = self.current(id, &mut cfg_rx, &params).await;
        let mut types: BTreeMap<String, SotwType> = BTreeMap::new();
        let mut nonce = 0u64;
        let mut pending = Some(first);
        loop {
            let req = match pending.take() {
                Some(r) => Some(r),
                None => tokio::select! {
                    m = inbound.message() => match m? { Some(r) => Some(r), None => return Ok(()) },
                    changed = cfg_rx.changed() => {
                        if changed.is_err() { return Ok(()); }
                        current = self.current(id, &mut cfg_rx, &params).await;
                        None
                    }
                },
            };
            let Some(res) = current.clone() else {
                if let Some(req) = req {
                    // Remember the subscription; answer once there is config.
                    types.entry(req.type_url.clone()).or_default().names = req.resource_names;
                }
                continue;
            };
            match req {
                Some(req) => {
                    let entry = types.entry(req.type_url.clone()).or_default();
                    if !req.response_nonce.is_empty() {
                        if req.response_nonce != entry.nonce {
                            continue; // an answer to an older response
                        }
                        if let Some(err) = &req.error_detail {
                            let text = nack_text(err);
                            tracing::warn!(node = %node.id, type_url = %req.type_url, error = %text, "NACK");
                            self.registry.update(id, |s| s.last_nack = Some(text));
                            continue;
                        }
                        self.registry.update(id, |s| {
                            s.acked_version.clone_from(&req.version_info);
                            s.last_nack = None;
                        });
                        if req.resource_names == entry.names {
                            continue;
                        }
                    }
                    entry.names = req.resource_names;
                    let resp = sotw_response(&res, &req.type_url, entry, &mut nonce);
                    if !inbound.send(tx, Ok(resp)).await {
                        return Ok(());
                    }
                }
                None => {
                    for &t in types_for(params.mode) {
                        if let Some(entry) = types.get_mut(t)
                            && entry.sent_version != res.version
                        {
                            let resp = sotw_response(&res, t, entry, &mut nonce);
                            if !inbound.send(tx, Ok(resp)).await {
                                return Ok(());
                            }
                        }
                    }
                }
            }
        }
    }

    async fn delta(
        &self,
        inbound: &mut Requests<DeltaDiscoveryRequest>,
        tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
        caller: Option<crate::identity::WorkloadId>,
    ) -> Result<(), Status> {
        let Some(first) = inbound.message().await? else {
            return Ok(());
        };
        let (node, params, id, _dereg) =
            self.begin(first.node.clone(), "delta", caller.as_ref())?;
        // A first push is the big message: at most MAX_FULL_PUSHES streams
        // have one in flight (until the client ACKs it, or 10 s), so memory
        // does not grow with the number of proxies connecting at once.
        let mut permit = Some(
            self.full_pushes
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Status::unavailable("shutting down"))?,
        );
        let permit_deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut first_acks = 0usize;
        let mut cfg_rx = self.config.clone();
        let mut current = self.current(id, &mut cfg_rx, &params).await;
        let mut last_good = current.clone();
        let mut pushed = current
            .as_ref()
            .map(|r| r.version.clone())
            .unwrap_or_default();
        let mut types: BTreeMap<String, DeltaType> = BTreeMap::new();
        let mut nonce = 0u64;
        let mut pending = Some(first);
        loop {
            let req = match pending.take() {
                Some(r) => Some(r),
                None => tokio::select! {
                    m = inbound.message() => match m? { Some(r) => Some(r), None => return Ok(()) },
                    changed = cfg_rx.changed() => {
                        if changed.is_err() { return Ok(()); }
                        current = self.current(id, &mut cfg_rx, &params).await;
                        None
                    }
                    _ = tokio::time::sleep_until(permit_deadline), if permit.is_some() => {
                        permit = None;
                        None
                    }
                },
            };
            if current.is_some() {
                last_good.clone_from(&current);
            }
            match req {
                Some(req) => {
                    let Some(t) = types_for(params.mode)
                        .iter()
                        .copied()
                        .find(|t| *t == req.type_url)
                    else {
                        return Err(Status::invalid_argument(format!(
                            "unknown type {}",
                            req.type_url
                        )));
                    };
                    let entry = types.entry(req.type_url.clone()).or_default();
                    let mut new_names = Vec::new();
                    if !req.response_nonce.is_empty() {
                        // An answer to an older response (a middle chunk, or
                        // one a push overtook) says nothing of the current
                        // state; its subscription changes still count.
                        if req.response_nonce == entry.nonce {
                            if permit.is_some() {
                                first_acks += 1;
                                if first_acks >= types_for(params.mode).len() {
                                    permit = None;
                                }
                            }
                            if let Some(err) = &req.error_detail {
                                let text = nack_text(err);
                                tracing::warn!(node = %node.id, type_url = %req.type_url, error = %text, "NACK");
                                self.registry.update(id, |s| s.last_nack = Some(text));
                            } else {
                                let v = entry
                                    .sent
                                    .as_ref()
                                    .map(|r| r.version.clone())
                                    .unwrap_or_default();
                                self.registry.update(id, |s| {
                                    s.acked_version = v;
                                    s.last_nack = None;
                                });
                            }
                        }
                        if req.resource_names_subscribe.is_empty()
                            && req.resource_names_unsubscribe.is_empty()
                        {
                            continue;
                        }
                    } else {
                        // First request of this type on this stream.
                        entry.wildcard = req.resource_names_subscribe.is_empty()
                            || req.resource_names_subscribe.iter().any(|n| n == "*");
                        if !req.initial_resource_versions.is_empty() {
                            entry.resumed =
                                Some(req.initial_resource_versions.clone().into_iter().collect());
                        }
                    }
                    for n in &req.resource_names_subscribe {
                        if n != "*" && entry.names.insert(n.clone()) && entry.sent.is_some() {
                            new_names.push(n.clone());
                        }
                    }
                    for n in &req.resource_names_unsubscribe {
                        if n == "*" {
                            entry.wildcard = false;
                        }
                        entry.names.remove(n);
                    }
                    if let Some(res) = &last_good {
                        let resps =
                            self.delta_response(res, t, entry, &mut nonce, &new_names, true);
                        for resp in resps {
                            if !inbound.send(tx, Ok(resp)).await {
                                return Ok(());
                            }
                        }
                    }
                }
                None => {
                    let Some(res) = &current else { continue };
                    if res.version == pushed {
                        continue; // the config changed, not this proxy's part of it
                    }
                    pushed.clone_from(&res.version);
                    // Only the types that changed, in dependency order.
                    let mut push = Vec::new();
                    for &t in types_for(params.mode) {
                        if let Some(entry) = types.get_mut(t) {
                            // Nothing for an unchanged type (and no nonce: the
                            // client's last ACK of it stays the current one).
                            push.extend(self.delta_response(res, t, entry, &mut nonce, &[], false));
                        }
                    }
                    // The last response of a push says so: its nonce ends in
                    // PUSH_END. A Bosun proxy applies its set then; to other
                    // clients a nonce is opaque.
                    if let Some(last) = push.last_mut() {
                        last.nonce.push(PUSH_END);
                        if let Some(entry) = types.get_mut(&last.type_url) {
                            entry.nonce.clone_from(&last.nonce);
                        }
                    }
                    for resp in push {
                        if !inbound.send(tx, Ok(resp)).await {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// What this stream lacks of `res` for type `t`: against what was last
    /// sent (a shared, cached diff), against the versions a resumed client
    /// announced, or everything on a first response; plus `extra` names the
    /// client just subscribed to. In chunks of about [`CHUNK_BYTES`]; every
    /// chunk but the last has a nonce ending in [`MORE`]. With `always`, at
    /// least one response, maybe empty (the answer to a request); without,
    /// none when there is nothing to send.
    fn delta_response(
        &self,
        res: &Arc<Resources>,
        t: &'static str,
        entry: &mut DeltaType,
        nonce: &mut u64,
        extra: &[String],
        always: bool,
    ) -> Vec<DeltaDiscoveryResponse> {
        let empty = TypeMap::default();
        let all = res.by_type.get(t).unwrap_or(&empty);
        let wanted = |name: &str| entry.wildcard || entry.names.contains(name);
        let resource = |name: &str, n: &Named| Resource {
            version: n.version.clone(),
            resource: Some(n.any.clone()),
            name: name.to_string(),
            aliases: vec![],
            ttl: None,
        };
        let (mut resources, removed): (Vec<Resource>, Vec<String>) =
            if let Some(known) = entry.resumed.take() {
                (
                    all.iter()
                        .filter(|(name, n)| wanted(name) && known.get(*name) != Some(&n.version))
                        .map(|(name, n)| resource(name, n))
                        .collect(),
                    known
                        .keys()
                        .filter(|name| !all.contains_key(*name))
                        .cloned()
                        .collect(),
                )
            } else if let Some(prev) = &entry.sent {
                if Arc::ptr_eq(prev, res) || prev.version == res.version {
                    (vec![], vec![])
                } else {
                    let d = self.diff(prev, res, t);
                    (
                        d.changed
                            .iter()
                            .filter(|(name, _)| wanted(name))
                            .map(|(name, n)| resource(name, n))
                            .collect(),
                        d.removed
                            .iter()
                            .filter(|name| wanted(name))
                            .cloned()
                            .collect(),
                    )
                }
            } else {
                (
                    all.iter()
                        .filter(|(name, _)| wanted(name))
                        .map(|(name, n)| resource(name, n))
                        .collect(),
                    vec![],
                )
            };
        for name in extra {
            if let Some(n) = all.get(name)
                && !resources.iter().any(|r| r.name == *name)
            {
                resources.push(resource(name, n));
            }
        }
        entry.sent = Some(res.clone());
        if !always && resources.is_empty() && removed.is_empty() {
            return Vec::new();
        }
        let mut chunks: Vec<Vec<Resource>> = vec![Vec::new()];
        let mut size = 0;
        for r in resources {
            let n =
                r.name.len() + r.version.len() + r.resource.as_ref().map_or(0, |a| a.value.len());
            if size + n > CHUNK_BYTES && chunks.last().is_some_and(|c| !c.is_empty()) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += n;
            if let Some(c) = chunks.last_mut() {
                c.push(r);
            }
        }
        let last = chunks.len() - 1;
        let mut removed = Some(removed);
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, resources)| {
                *nonce += 1;
                entry.nonce = nonce.to_string();
                if i < last {
                    entry.nonce.push(MORE);
                }
                DeltaDiscoveryResponse {
                    system_version_info: res.version.clone(),
                    resources,
                    type_url: t.to_string(),
                    nonce: entry.nonce.clone(),
                    // Removals go with the last chunk, when the set is whole.
                    removed_resources: if i == last {
                        removed.take().unwrap_or_default()
                    } else {
                        Vec::new()
                    },
                    control_plane: None,
                }
            })
            .collect()
    }
}

fn sotw_response(
    res: &Resources,
    t: &str,
    entry: &mut SotwType,
    nonce: &mut u64,
) -> DiscoveryResponse {
    *nonce += 1;
    entry.nonce = nonce.to_string();
    entry.sent_version.clone_from(&res.version);
    let resources = res
        .by_type
        .get(t)
        .map(|m| {
            m.iter()
                .filter(|(name, _)| entry.names.is_empty() || entry.names.contains(name))
                .map(|(_, n)| n.any.clone())
                .collect()
        })
        .unwrap_or_default();
    DiscoveryResponse {
        version_info: res.version.clone(),
        resources,
        canary: false,
        type_url: t.to_string(),
        nonce: entry.nonce.clone(),
        control_plane: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::load_sources;
    use std::collections::BTreeSet;

    const CANARY: &str = include_str!("../../examples/canary/canary.yaml");
    use crate::translate::tests::SHOP;

    fn prepared(canary: &str, shop: &str) -> crate::model::Config {
        load_sources(&[
            ("canary.yaml".into(), canary.into()),
            ("shop.yaml".into(), shop.into()),
        ])
        .expect("parses")
    }

    fn versions(r: &Resources) -> BTreeMap<&'static str, BTreeMap<String, String>> {
        r.by_type
            .iter()
            .map(|(t, m)| {
                let v = m.iter().map(|(n, x)| (n.clone(), x.version.clone()));
                (*t, v.collect())
            })
            .collect()
    }

    fn every_kind_of_proxy() -> Vec<ProxyParams> {
        vec![
            ProxyParams {
                namespace: "shop".into(),
                ..Default::default()
            },
            ProxyParams {
                namespace: "demo".into(),
                ..Default::default()
            },
            ProxyParams {
                mode: ProxyMode::Gateway,
                labels: [("istio".to_string(), "ingressgateway".to_string())].into(),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn an_endpoint_update_patches_exactly_what_a_full_translation_gives() {
        let old = Prepared::new(prepared(CANARY, SHOP));
        old.check().expect("valid");
        // ServiceEntry endpoints move and one is added; a slice endpoint moves.
        let v2 = "    labels: {app: reviews, version: v2, security.istio.io/tlsMode: istio}\n";
        assert!(CANARY.contains(v2) && CANARY.contains("18092"));
        let canary = CANARY.replace("18092", "18094").replace(
            v2,
            &format!("{v2}  - address: 127.0.0.2\n    ports: {{http: 18083}}\n{v2}"),
        );
        let shop = SHOP.replace("10.0.0.2", "10.0.0.3");
        let new = Prepared::update(&old, prepared(&canary, &shop));
        new.check().expect("valid");
        let update = new.endpoint_update().expect("only endpoints changed");
        assert_eq!(update.base, old.id());
        let hosts: BTreeSet<&str> = update.hosts.iter().map(String::as_str).collect();
        assert_eq!(
            hosts,
            BTreeSet::from([
                "reviews.demo.svc.cluster.local",
                "reviews.shop.svc.cluster.local"
            ])
        );
        for p in every_kind_of_proxy() {
            let before = split(&old.translate(&p).expect("translates"));
            let full = split(&new.translate(&p).expect("translates"));
            let patched = patch(&before, &new, &p, &update.hosts);
            assert_eq!(versions(&patched), versions(&full), "{p:?}");
            assert_eq!(patched.version, full.version, "{p:?}");
            // Something did change for proxies that see these hosts.
            assert_ne!(before.version, full.version, "{p:?}");
            // Only endpoints: every other type is the same map, shared.
            for t in [
                type_url::LISTENER,
                type_url::ROUTE_CONFIGURATION,
                type_url::CLUSTER,
            ] {
                assert!(Arc::ptr_eq(&before.by_type[t], &patched.by_type[t]));
            }
        }
    }

    #[test]
    fn anything_but_endpoints_prepares_and_checks_the_whole_config() {
        let old = Prepared::new(prepared(CANARY, SHOP));
        for (what, canary, shop) in [
            (
                "a subset's labels",
                CANARY.to_string(),
                SHOP.replace("{version: v2}}]", "{version: v3}}]"),
            ),
            (
                "a ServiceEntry port",
                CANARY.replace(
                    "number: 8080, name: http, protocol: HTTP}\n  endpoints",
                    "number: 8081, name: http, protocol: HTTP}\n  endpoints",
                ),
                SHOP.to_string(),
            ),
            (
                "a Pod's labels",
                CANARY.to_string(),
                SHOP.replace("version: v1}}", "version: v9}}"),
            ),
        ] {
            assert!(canary != CANARY || shop != SHOP, "{what}: fixture");
            let new = Prepared::update(&old, prepared(&canary, &shop));
            assert!(new.endpoint_update().is_none(), "{what}");
        }
        // The same config again: an update of nothing.
        let same = Prepared::update(&old, prepared(CANARY, SHOP));
        assert!(same.endpoint_update().is_some_and(|u| u.hosts.is_empty()));
    }
}
