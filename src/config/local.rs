//! `[local]`: the broker the cab iPads connect to, its devices and their groups.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::Invalid;
use crate::topic;

/// `[local]`: the broker the cab iPads connect to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub max_packet_size: ByteSize,
    pub receive_maximum: u16,
    /// Bytes of one iPad's messages awaiting the store's commit beyond which the broker stops
    /// reading that iPad until the store catches up (backpressure).
    pub max_uncommitted: ByteSize,
    pub max_queued_messages: usize,
    pub max_subscriptions: usize,
    #[serde(with = "humantime_serde")]
    pub max_session_expiry: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Local topic prefix of per-iPad topics: `{device_prefix}/{client_id}/...` is delivered
    /// only to the iPad with that client id.
    pub device_prefix: String,
    /// Whether clients without a username may connect. Default: true when no device is
    /// configured (the laptop defaults), false as soon as one is.
    pub allow_anonymous: Option<bool>,
    /// A separate TOML file of `[[device]]` entries (same keys as `[[local.device]]`), so the
    /// main config can stay world-readable; it must not be.
    pub credentials_file: Option<PathBuf>,
    /// The cab devices that may connect (see `auth`).
    #[serde(rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Named ACLs shared by devices.
    #[serde(rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// Sockets one source address may hold open at once.
    pub max_connections_per_address: usize,
    /// PUBLISH packets per second a client may send (token bucket with a burst of the same
    /// size); beyond it the client is disconnected (v5: reason 0x96). 0: no limit. Default:
    /// 1000 once devices are configured, no limit in open (laptop) mode, where test
    /// publishers push bursts of thousands.
    pub max_publish_rate: Option<u32>,
    /// Address of the MQTT-over-WebSocket listener (subprotocol `mqtt`, plain HTTP).
    pub ws_listen: Option<SocketAddr>,
    /// Address of the MQTT-over-TLS listener (needs `tls_cert` and `tls_key`).
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listener.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener; refused when readable by every user.
    pub tls_key: Option<PathBuf>,
    /// PEM CA of client certificates (mTLS): a certificate's subject CN names the device.
    pub tls_client_ca: Option<PathBuf>,
}

/// `[[local.device]]`: one cab device and its credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The MQTT username; the client id must be this name or start with `{name}-`.
    #[serde(alias = "username")]
    pub name: String,
    /// Argon2 PHC string from `trainrelay passwd`.
    pub password_hash: String,
    /// Group whose ACL applies when the device has no `publish` / `subscribe` of its own.
    pub group: Option<String>,
    /// Topic filters the device may publish to (`{client_id}` is substituted).
    pub publish: Option<Vec<String>>,
    /// Topic filters the device may subscribe to (a subscription must be covered by one).
    pub subscribe: Option<Vec<String>>,
    /// The device may connect with any client id (for apps whose library picks its own), but
    /// never one another configured device owns. Unset: the group's setting, else false.
    pub any_client_id: Option<bool>,
}

/// `[[local.group]]`: an ACL shared by devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
    /// Devices of this group may connect with any client id no other device owns.
    #[serde(default)]
    pub any_client_id: bool,
}

/// A credentials file: only `[[device]]` entries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CredentialsFile {
    #[serde(default, rename = "device")]
    pub(super) devices: Vec<DeviceConfig>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 64,
            max_packet_size: ByteSize::mib(1),
            receive_maximum: 1024,
            max_uncommitted: ByteSize::mib(1),
            max_queued_messages: 1000,
            max_subscriptions: 64,
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            connect_timeout: Duration::from_secs(10),
            device_prefix: "down/device".into(),
            allow_anonymous: None,
            credentials_file: None,
            devices: Vec::new(),
            groups: Vec::new(),
            max_connections_per_address: 16,
            max_publish_rate: None,
            ws_listen: None,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

impl LocalConfig {
    /// Whether the local broker requires credentials (any device configured).
    pub fn secured(&self) -> bool {
        !self.devices.is_empty() || self.credentials_file.is_some()
    }

    /// Devices, groups and `allow_anonymous` must agree: names unique, hashes readable,
    /// groups defined, filters valid.
    pub(super) fn validate_devices(&self) -> Result<(), Invalid> {
        let invalid = |key: String, message: String| Invalid::new(key, message);
        if self.allow_anonymous == Some(false) && !self.secured() {
            return Err(invalid(
                "local.allow_anonymous".into(),
                "false needs at least one [[local.device]] or local.credentials_file".into(),
            ));
        }
        let check_filters = |key: String, filters: &Option<Vec<String>>| {
            for f in filters.iter().flatten() {
                let expanded = f.replace("{client_id}", "x");
                topic::validate_filter(&expanded)
                    .map_err(|e| invalid(key.clone(), format!("filter '{f}' {e}")))?;
            }
            Ok(())
        };
        let mut names = std::collections::HashSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            if !names.insert(g.name.as_str()) {
                return Err(invalid(
                    format!("local.group[{i}].name"),
                    format!("group '{}' is defined twice", g.name),
                ));
            }
            check_filters(format!("local.group[{i}].publish"), &g.publish)?;
            check_filters(format!("local.group[{i}].subscribe"), &g.subscribe)?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            let key = |k: &str| format!("local.device[{i}].{k}");
            if !crate::broker::valid_device_name(&d.name) {
                return Err(invalid(
                    key("name"),
                    format!(
                        "'{}' must be 1 to 64 characters of letters, digits, '.', '_', ':', '-'",
                        d.name
                    ),
                ));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("device '{}' is defined twice", d.name),
                ));
            }
            if let Err(e) = crate::password::check_hash(&d.password_hash) {
                return Err(invalid(
                    key("password_hash"),
                    format!(
                        "device '{}': {e} (make one with `trainrelay passwd`)",
                        d.name
                    ),
                ));
            }
            if let Some(g) = &d.group {
                if !self.groups.iter().any(|x| &x.name == g) {
                    return Err(invalid(
                        key("group"),
                        format!("no [[local.group]] named '{g}'"),
                    ));
                }
            }
            check_filters(key("publish"), &d.publish)?;
            check_filters(key("subscribe"), &d.subscribe)?;
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.receive_maximum == 0 {
            return Err(Invalid::new("local.receive_maximum", "must be at least 1"));
        }
        if self.tls_listen.is_some() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err(Invalid::new(
                "local.tls_listen",
                "needs local.tls_cert and local.tls_key",
            ));
        }
        if self.max_connections_per_address == 0 {
            return Err(Invalid::new(
                "local.max_connections_per_address",
                "must be at least 1",
            ));
        }
        if self.max_connections == 0 {
            return Err(Invalid::new("local.max_connections", "must be at least 1"));
        }
        if self.max_packet_size.as_u64() > u64::from(u32::MAX >> 4)
            || self.max_packet_size.as_u64() < 64
        {
            return Err(Invalid::new(
                "local.max_packet_size",
                "must be between 64B and 256MiB",
            ));
        }
        if topic::validate_name(&self.device_prefix).is_err() || self.device_prefix.is_empty() {
            return Err(Invalid::new(
                "local.device_prefix",
                format!("'{}' must be a topic without wildcards", self.device_prefix),
            ));
        }
        Ok(())
    }
}
