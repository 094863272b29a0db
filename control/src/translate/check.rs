//! The config check: a config translated for every kind of proxy.

use bosun_xds_proto::config as pb;

use super::prepared::prepare;
use super::{ProxyMode, ProxyParams, translate_with};
use crate::error::{ConfigError, ConfigErrors};
use crate::model::Config;

/// Checks a whole config the way every proxy will see it: translated for a
/// sidecar and for a gateway selected by every Gateway's selector, so each
/// route, server and destination is checked once. Errors are deduplicated.
pub fn check(cfg: &Config) -> Result<(), ConfigErrors> {
    let (reg, errors) = prepare(cfg);
    check_with(cfg, |params| {
        translate_with(cfg, &reg, errors.clone(), params)
    })
}

pub(super) fn check_with(
    cfg: &Config,
    translate: impl Fn(&ProxyParams) -> Result<pb::ProxyConfig, ConfigErrors>,
) -> Result<(), ConfigErrors> {
    let mut errors: Vec<ConfigError> = Vec::new();
    for mode in [ProxyMode::Sidecar, ProxyMode::Gateway] {
        let mut params = ProxyParams {
            mode,
            check_only: true,
            ..Default::default()
        };
        for g in &cfg.gateways {
            params.labels.extend(g.value.spec.selector.clone());
        }
        if let Err(e) = translate(&params) {
            for err in e.0 {
                if !errors.contains(&err) {
                    errors.push(err);
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}
