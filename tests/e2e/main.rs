//! End-to-end tests: the real `bosun` binary, real sockets on 127.0.0.1,
//! real clients (hyper, curl, h2load, tonic). One test binary, several
//! modules, so the workspace links once.

mod balancing;
mod capture;
mod config;
mod gateway_tls;
mod hardening;
mod harness;
mod kube;
mod mesh;
mod mtls;
mod node;
mod protocols;
mod resilience;
mod routing;
mod xds;
