//! What a control service (or anyone who reaches the proxy's xDS client)
//! sends: any bytes decoded as a `bosun.config.v1` ProxyConfig, then built
//! into a snapshot. Refusals are fine; panics and runaway memory are not.
#![no_main]

use bosun_proxy::cluster::EndpointRegistry;
use bosun_proxy::config::{BuildContext, Snapshot};
use bosun_proxy::identity::ProxyIdentity;
use bosun_proxy::pool::{PoolOptions, Pools};
use bosun_xds_proto::config as pb;
use bosun_xds_proto::prost::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = pb::ProxyConfig::decode(data) else {
        return;
    };
    let id = ProxyIdentity::default();
    let endpoints = EndpointRegistry::default();
    let pools = Pools::new(PoolOptions::new(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(1),
    ));
    let ctx = BuildContext {
        identity: &id,
        endpoints: &endpoints,
        pools: &pools,
        dns: None,
    };
    let _ = Snapshot::build(cfg, &ctx);
});
