//! Who this proxy is: the `source_*` labels of its metrics. The peer's
//! identity (SPIFFE, from mTLS) will live here too.

/// This proxy's workload, for the `source_*` metric labels.
#[derive(Debug, Clone, Default)]
pub struct ProxyIdentity {
    pub workload: String,
    pub namespace: String,
    pub app: String,
    pub version: String,
    /// region/zone/subzone (`--locality`); empty: unknown.
    pub locality: String,
    /// Workload labels (DestinationRule `failoverPriority` compares them).
    pub labels: std::collections::BTreeMap<String, String>,
}
