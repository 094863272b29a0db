//! Bosun control: the Istio/Kubernetes configuration model, its validation,
//! and its translation into `bosun.config.v1` resources for one proxy.
//!
//! Sources: a watched file or directory ([`source`]) and etcd ([`etcd`]).
//! [`xds`] serves the translated resources to proxies over Envoy's ADS.

pub mod admin;
pub mod ca;
pub mod error;
pub mod etcd;
pub mod identity;
pub mod inject;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod load;
pub mod locate;
pub mod model;
pub mod node_services;
pub mod services;
pub mod source;
pub mod translate;
pub mod validate;
pub mod webhook;
pub mod xds;

pub use error::{ConfigError, ConfigErrors};
pub use translate::{ProxyMode, ProxyParams, translate};
