//! Bosun control: the Istio/Kubernetes configuration model, its validation,
//! and its translation into `bosun.config.v1` resources for one proxy.
//!
//! Sources ([`source`]) read YAML files today; the xDS server and the etcd
//! and Kubernetes sources build on the same [`model`] and [`translate`].

pub mod load;
pub mod model;
pub mod source;
pub mod translate;
pub mod validate;
pub mod xds;

pub use load::{ConfigError, ConfigErrors};
pub use translate::{ProxyMode, ProxyParams, translate};
