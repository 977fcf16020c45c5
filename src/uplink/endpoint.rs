//! Where the central broker is: `mqtt://`, `mqtts://`, `ws://` or `wss://` URLs, tried in
//! the configured order (the first is the primary, e.g. the depot WLAN; the others are
//! fallbacks, e.g. cellular).

use std::time::Duration;

/// How the bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// MQTT over TCP.
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS (port 443 gets through most firewalls).
    Wss,
}

impl Scheme {
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Mqtts | Scheme::Wss)
    }

    pub fn is_websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }
}

/// Why an endpoint URL is refused; each names the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("'{0}' must start with mqtt://, mqtts://, ws:// or wss://")]
    Scheme(String),
    #[error("'{0}': only ws:// and wss:// URLs take a path")]
    Path(String),
    #[error("'{0}' must look like scheme://host[:port]")]
    Malformed(String),
}

/// One central-broker endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// As configured, for logs and status.
    pub url: String,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// WebSocket path (with the leading `/`); `/` for the others.
    pub path: String,
}

impl Endpoint {
    /// Parses `scheme://host[:port][/path]`; a path is allowed only for WebSocket URLs.
    pub fn parse(url: &str) -> Result<Endpoint, EndpointError> {
        let (scheme, rest, default_port) = if let Some(r) = url.strip_prefix("mqtt://") {
            (Scheme::Mqtt, r, 1883)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (Scheme::Mqtts, r, 8883)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (Scheme::Ws, r, 80)
        } else if let Some(r) = url.strip_prefix("wss://") {
            (Scheme::Wss, r, 443)
        } else {
            return Err(EndpointError::Scheme(url.to_string()));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if !scheme.is_websocket() && path != "/" {
            return Err(EndpointError::Path(url.to_string()));
        }
        let bad = || EndpointError::Malformed(url.to_string());
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(port) => (host, port.parse().map_err(|_| bad())?),
                None if after.is_empty() => (host, default_port),
                None => return Err(bad()),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Endpoint {
            url: url.to_string(),
            scheme,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// Whether something accepts TCP connections there now: the cheap health check of a
    /// primary endpoint while the uplink runs on a fallback. Name resolution runs on tokio's
    /// blocking pool, so a hanging resolver delays only this check, bounded by `within`.
    pub async fn reachable(&self, within: Duration) -> bool {
        let target = (self.host.clone(), self.port);
        matches!(
            tokio::time::timeout(within, tokio::net::TcpStream::connect(target)).await,
            Ok(Ok(_))
        )
    }
}

/// `url` without user info (`mqtt://user:secret@host` -> `mqtt://host`), for reports and logs.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = Endpoint::parse("mqtt://h:1884").unwrap();
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port),
            (Scheme::Mqtt, "h", 1884)
        );
        assert_eq!(Endpoint::parse("mqtts://h").unwrap().port, 8883);
        let w = Endpoint::parse("wss://central.example.net/mqtt").unwrap();
        assert_eq!(
            (w.scheme, w.port, w.path.as_str()),
            (Scheme::Wss, 443, "/mqtt")
        );
        assert_eq!(Endpoint::parse("ws://[::1]:8080").unwrap().host, "::1");
        assert!(Endpoint::parse("mqtt://h/x").is_err());
        assert!(Endpoint::parse("http://h").is_err());
        assert!(Endpoint::parse("mqtt://").is_err());
        assert!(Endpoint::parse("mqtt://h:0").is_err());
    }

    #[test]
    fn config_takes_url_or_an_ordered_endpoint_list_not_both() {
        use crate::config::Config;
        let parse = |t: &str| Config::parse(t, std::path::Path::new("t.toml"));
        let c = parse(
            "train_id = \"T1\"\n[uplink]\nendpoints = [\"mqtt://wlan-gw:1883\", \"mqtt://cell:1883\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.uplink.endpoint_urls(),
            vec!["mqtt://wlan-gw:1883", "mqtt://cell:1883"]
        );
        let c = parse("train_id = \"T1\"\n[uplink]\nurl = \"mqtt://c:1\"\n").unwrap();
        assert_eq!(c.uplink.endpoint_urls(), vec!["mqtt://c:1"]);
        let e = parse(
            "train_id = \"T1\"\n[uplink]\nurl = \"mqtt://c:1\"\nendpoints = [\"mqtt://d:1\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("uplink.endpoints"), "{e}");
        let e = parse("train_id = \"T1\"\n[uplink]\nendpoints = [\"mqtt://d:1\", \"ftp://x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("uplink.endpoints") && e.contains("ftp://x"),
            "{e}"
        );
    }

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(redact_url("mqtt://u:p@h:1884"), "mqtt://h:1884");
        assert_eq!(redact_url("mqtt://h:1884"), "mqtt://h:1884");
    }
}
