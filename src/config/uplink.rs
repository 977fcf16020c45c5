//! `[uplink]`: the connection to the central broker. The keys are the uplink's own types
//! ([`crate::uplink::config`]); this checks their values.

use std::time::Duration;

use super::Invalid;
pub use crate::uplink::config::{Protocol, UplinkConfig};
use crate::uplink::endpoint::Endpoint;
use crate::uplink::transport::HttpProxy;

/// Checks the `[uplink]` section, including that the TLS files it names can be used.
pub(super) fn validate(u: &UplinkConfig) -> Result<(), Invalid> {
    let invalid = |key: &str, message: String| Invalid::new(key, message);
    let key = if u.endpoints.is_empty() {
        "uplink.url"
    } else {
        "uplink.endpoints"
    };
    let mut tls = false;
    for url in u.endpoint_urls() {
        let endpoint = Endpoint::parse(&url).map_err(|e| invalid(key, e.to_string()))?;
        tls |= endpoint.scheme.is_tls();
    }
    if tls {
        crate::uplink::tls::client_config(u).map_err(|e| invalid(e.key, e.message))?;
    }
    if u.probe_primary_every < Duration::from_secs(1) {
        return Err(invalid(
            "uplink.probe_primary_every",
            "must be at least 1s".into(),
        ));
    }
    // Pinging a cellular link more often than every 5 s costs data and catches nothing
    // the route watch does not; the upper bound is what MQTT can carry.
    if u.keep_alive < Duration::from_secs(5) || u.keep_alive > Duration::from_secs(65535) {
        return Err(invalid(
            "uplink.keep_alive",
            "must be between 5s and 65535s".into(),
        ));
    }
    if u.max_attempts == 0 {
        return Err(invalid("uplink.max_attempts", "must be at least 1".into()));
    }
    if u.backoff_min.is_zero() || u.backoff_min > u.backoff_max {
        return Err(invalid(
            "uplink.backoff_min",
            "must be above zero and not above uplink.backoff_max".into(),
        ));
    }
    if let Some(proxy) = &u.proxy {
        if HttpProxy::parse(proxy).is_none() {
            return Err(invalid(
                "uplink.proxy",
                format!("'{proxy}' must look like http://[user:password@]host:port"),
            ));
        }
    }
    if !(1..=16).contains(&u.connections) {
        return Err(invalid(
            "uplink.connections",
            format!("must be 1 to 16, not {}", u.connections),
        ));
    }
    if u.inflight == Some(0) {
        return Err(invalid("uplink.inflight", "must be at least 1".into()));
    }
    Ok(())
}
