//! Who may connect to the local broker, and what each client may publish and subscribe to.
//!
//! The onboard Wi-Fi is not a trusted network: a passenger's phone or a misconfigured tablet may
//! be on it, and whoever can publish `down/...` can show a driver a false speed restriction.
//!
//! - **Authentication.** Each cab device has a name (its MQTT username) and an argon2 hash of
//!   its password (PHC string, salted; `trainrelay passwd` makes one). Verification is
//!   argon2's, which compares in constant time; an unknown username is verified against a dummy
//!   hash so its answer takes as long as a wrong password. A device's client id must be its
//!   name or start with `{name}-`, so one device cannot take over another's session or read its
//!   device topic (`down/device/{client_id}/...`). A device (or its group) with
//!   `any_client_id = true` may use any id except one another device owns. A wrong client id
//!   with the right password is [`AuthVerdict::ClientIdNotAllowed`], not a failed login.
//! - **Open mode.** With no device configured (the built-in laptop defaults), anonymous clients
//!   are let in and only the relay's fixed rules apply (no publishing into downlink topics,
//!   device topics private). Configuring one device switches to secured mode: anonymous
//!   clients are refused unless `local.allow_anonymous = true`, and every client gets an ACL.
//! - **ACL.** A device's own `publish` / `subscribe` lists, else its group's, else the safe
//!   defaults: publish only into uplink routes' local filters; subscribe only to downlink
//!   routes' local topics and the device's own device topic. A subscription is allowed only if
//!   one allowed filter covers every topic it could match ([`topic::covers`]), so `#` is
//!   refused, not narrowed. Downlink routes' local topics stay closed to every client whatever
//!   the ACL says (the relay checks that first).

use std::collections::HashMap;

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;

use crate::broker::{AuthVerdict, ClientInfo};
use crate::config::Config;
use crate::route::Routes;
use crate::topic;

/// Which topics a client may publish to and which filters it may subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    /// Filters a published topic must match; `{client_id}` is substituted.
    pub publish: Vec<String>,
    /// Filters one of which must cover a subscription; `{client_id}` is substituted.
    pub subscribe: Vec<String>,
}

impl Acl {
    /// The safe defaults: publish into uplink routes, subscribe to downlink routes and the own
    /// device topic.
    pub fn defaults(routes: &Routes, device_prefix: &str) -> Acl {
        Acl {
            publish: routes.up_local_filters(),
            subscribe: routes
                .down_local_patterns()
                .into_iter()
                .chain(std::iter::once(format!("{device_prefix}/{{client_id}}/#")))
                .collect(),
        }
    }

    /// `{client_id}` is replaced by the id as one topic level ([`topic::id_level`]), so an id
    /// like `a/b` or `#` cannot widen the filter.
    pub fn may_publish(&self, client_id: &str, topic_name: &str) -> bool {
        let level = topic::id_level(client_id);
        self.publish
            .iter()
            .any(|f| topic::matches(&f.replace("{client_id}", &level), topic_name))
    }

    pub fn may_subscribe(&self, client_id: &str, filter: &str) -> bool {
        let level = topic::id_level(client_id);
        self.subscribe
            .iter()
            .any(|f| topic::covers(&f.replace("{client_id}", &level), filter))
    }
}

struct Device {
    hash: String,
    acl: Acl,
    /// May use any client id that no other device owns (`any_client_id`).
    any_client_id: bool,
}

/// The authentication and ACL decisions of the local broker.
pub struct Auth {
    /// Empty: open mode.
    devices: HashMap<String, Device>,
    allow_anonymous: bool,
    /// ACL of anonymous clients in secured mode.
    anonymous: Acl,
    /// A valid hash nobody knows the password of, verified for unknown usernames.
    dummy_hash: String,
}

/// The argon2id hash of a random password that was thrown away: verifying an unknown username
/// against it costs what a wrong password costs, so a refusal does not tell whether the device
/// exists. A constant, so that start-up does not spend an argon2 run (and its 19 MiB).
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$l9eEsgECXb4RMAzLAtkQSg$lsmOs9AF+9WZyGV0MHf8NaEEcaK1/Qy7qh1tjcqhKEQ";

impl Auth {
    /// Builds the decisions from a validated config.
    pub fn from_config(config: &Config, routes: &Routes) -> Auth {
        let defaults = Acl::defaults(routes, &config.local.device_prefix);
        let acl_of =
            |publish: &Option<Vec<String>>, subscribe: &Option<Vec<String>>, base: &Acl| Acl {
                publish: publish.clone().unwrap_or_else(|| base.publish.clone()),
                subscribe: subscribe.clone().unwrap_or_else(|| base.subscribe.clone()),
            };
        let groups: HashMap<&str, (Acl, bool)> = config
            .local
            .groups
            .iter()
            .map(|g| {
                (
                    g.name.as_str(),
                    (acl_of(&g.publish, &g.subscribe, &defaults), g.any_client_id),
                )
            })
            .collect();
        let devices = config
            .local
            .devices
            .iter()
            .map(|d| {
                let group = d.group.as_deref().and_then(|g| groups.get(g));
                let base = group.map_or(&defaults, |(acl, _)| acl);
                let acl = acl_of(&d.publish, &d.subscribe, base);
                let any_client_id = d
                    .any_client_id
                    .unwrap_or_else(|| group.is_some_and(|(_, any)| *any));
                (
                    d.name.clone(),
                    Device {
                        hash: d.password_hash.clone(),
                        acl,
                        any_client_id,
                    },
                )
            })
            .collect::<HashMap<_, _>>();
        let secured = config.secured();
        Auth {
            allow_anonymous: config.local.allow_anonymous.unwrap_or(!secured),
            devices,
            anonymous: defaults,
            dummy_hash: DUMMY_HASH.to_string(),
        }
    }

    /// Open mode: no device configured, no ACL beyond the relay's fixed rules.
    pub fn is_open(&self) -> bool {
        self.devices.is_empty()
    }

    /// Decides a CONNECT. Slow on purpose (argon2): call it off the async workers.
    ///
    /// A client that sends no username but presented a certificate (verified by the TLS
    /// listener against `tls_client_ca`) is the device named by its CN; a username, if sent,
    /// is checked with its password as on any listener.
    pub fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        cert_identity: Option<&str>,
    ) -> AuthVerdict {
        // Open mode: nothing to check credentials against; they are ignored as before.
        if self.is_open() && self.allow_anonymous {
            return AuthVerdict::Allow;
        }
        if let (None, Some(cn)) = (
            username,
            cert_identity.filter(|cn| self.devices.contains_key(*cn)),
        ) {
            return self.client_id_verdict(cn, client_id);
        }
        let Some(user) = username else {
            return if self.allow_anonymous {
                AuthVerdict::Allow
            } else {
                AuthVerdict::NotAuthorized
            };
        };
        let device = self.devices.get(user);
        let hash = device.map_or(self.dummy_hash.as_str(), |d| d.hash.as_str());
        let password = password.unwrap_or(b"");
        let ok = PasswordHash::new(hash)
            .map(|h| Argon2::default().verify_password(password, &h).is_ok())
            .unwrap_or(false);
        if !ok || device.is_none() {
            return AuthVerdict::BadCredentials;
        }
        self.client_id_verdict(user, client_id)
    }

    /// Whether authenticated `device` may use `client_id`: its own ids always; with
    /// `any_client_id` any other id too, except one that another configured device owns
    /// (which would let it take over that device's session and device topic).
    fn client_id_verdict(&self, device: &str, client_id: &str) -> AuthVerdict {
        if owns_client_id(device, client_id) {
            return AuthVerdict::Allow;
        }
        let any = self.devices.get(device).is_some_and(|d| d.any_client_id);
        let owned_by_other = self
            .devices
            .keys()
            .any(|other| other != device && owns_client_id(other, client_id));
        if any && !owned_by_other {
            AuthVerdict::Allow
        } else {
            AuthVerdict::ClientIdNotAllowed
        }
    }

    /// The ACL of a client; `None` in open mode (no restriction here).
    fn acl(&self, client: &ClientInfo) -> Option<&Acl> {
        if self.is_open() {
            return None;
        }
        Some(
            client
                .username
                .as_deref()
                .and_then(|u| self.devices.get(u))
                .map_or(&self.anonymous, |d| &d.acl),
        )
    }

    pub fn may_publish(&self, client: &ClientInfo, topic_name: &str) -> bool {
        self.acl(client)
            .map_or(true, |acl| acl.may_publish(&client.client_id, topic_name))
    }

    pub fn may_subscribe(&self, client: &ClientInfo, filter: &str) -> bool {
        self.acl(client)
            .map_or(true, |acl| acl.may_subscribe(&client.client_id, filter))
    }
}

/// A device may use its name as client id, or its name followed by `-` and anything (an app
/// that runs two connections).
fn owns_client_id(device: &str, client_id: &str) -> bool {
    client_id == device
        || client_id
            .strip_prefix(device)
            .is_some_and(|rest| rest.starts_with('-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::valid_device_name;
    use crate::password::hash_password;

    #[test]
    fn device_names() {
        for ok in ["ipad1", "a.b_c:d-e", &"x".repeat(64)] {
            assert!(valid_device_name(ok), "{ok}");
        }
        for bad in ["", "a/b", "a+b", "a#", "ä", "a b", "a\0", &"x".repeat(65)] {
            assert!(!valid_device_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn client_id_placeholder_is_one_level() {
        let acl = Acl {
            publish: vec!["up/{client_id}/#".into()],
            subscribe: vec!["down/device/{client_id}/#".into()],
        };
        assert!(acl.may_subscribe("a/b", "down/device/a%2Fb/#"));
        assert!(!acl.may_subscribe("a/b", "down/device/a/b"));
        assert!(!acl.may_subscribe("#", "down/device/x/y"));
        assert!(acl.may_subscribe("#", "down/device/%23/y"));
        assert!(!acl.may_publish("+", "up/x/y"));
        assert!(acl.may_publish("Cab iPad 3", "up/Cab%20iPad%203/ack"));
    }

    #[test]
    fn acl_checks() {
        let acl = Acl {
            publish: vec!["up/#".into(), "ipads/{client_id}/state".into()],
            subscribe: vec!["down/#".into(), "down/device/{client_id}/#".into()],
        };
        assert!(acl.may_publish("ipad1", "up/ack"));
        assert!(acl.may_publish("ipad1", "ipads/ipad1/state"));
        assert!(!acl.may_publish("ipad1", "ipads/ipad2/state"));
        assert!(!acl.may_publish("ipad1", "down/speed"));
        assert!(acl.may_subscribe("ipad1", "down/#"));
        assert!(acl.may_subscribe("ipad1", "down/+/x"));
        assert!(!acl.may_subscribe("ipad1", "#"));
        assert!(!acl.may_subscribe("ipad1", "+/speed"));
        assert!(!acl.may_subscribe("ipad1", "$SYS/#"));
        assert!(!acl.may_subscribe("ipad1", "up/#"));
    }

    #[test]
    fn open_and_secured_modes() {
        let mut config = Config::builtin();
        let routes = Routes::from_config(&config);
        let open = Auth::from_config(&config, &routes);
        assert!(open.is_open());
        assert_eq!(open.authenticate("x", None, None, None), AuthVerdict::Allow);
        assert_eq!(
            open.authenticate("x", Some("u"), Some(b"p"), None),
            AuthVerdict::Allow
        );
        let client = ClientInfo {
            client_id: "x".into(),
            username: None,
            peer: ([127, 0, 0, 1], 1).into(),
            protocol: crate::broker::Protocol::V5,
        };
        assert!(open.may_subscribe(&client, "#"));

        config.local.devices.push(crate::config::DeviceConfig {
            name: "ipad1".into(),
            password_hash: hash_password(b"pw").expect("hash"),
            group: None,
            publish: None,
            subscribe: None,
            any_client_id: None,
        });
        let secured = Auth::from_config(&config, &routes);
        assert_eq!(
            secured.authenticate("x", None, None, None),
            AuthVerdict::NotAuthorized
        );
        assert_eq!(
            secured.authenticate("ipad1", Some("ipad1"), Some(b"pw"), None),
            AuthVerdict::Allow
        );
        assert_eq!(
            secured.authenticate("ipad1", Some("ipad1"), Some(b"pW"), None),
            AuthVerdict::BadCredentials
        );
        assert_eq!(
            secured.authenticate("ipad1", None, None, Some("ipad1")),
            AuthVerdict::Allow
        );
        assert_eq!(
            secured.authenticate("other", None, None, Some("ipad1")),
            AuthVerdict::ClientIdNotAllowed
        );
        // Anonymous clients in secured mode get the default ACL.
        assert!(!secured.may_subscribe(&client, "#"));
        assert!(secured.may_subscribe(&client, "down/#"));
        assert!(secured.may_subscribe(&client, "down/device/x/#"));
        assert!(secured.may_publish(&client, "up/x"));
        assert!(!secured.may_publish(&client, "elsewhere"));
    }

    #[test]
    fn any_client_id_from_device_or_group_but_never_another_devices() {
        let mut config = Config::builtin();
        let routes = Routes::from_config(&config);
        let hash = hash_password(b"pw").expect("hash");
        let device =
            |name: &str, group: Option<&str>, any: Option<bool>| crate::config::DeviceConfig {
                name: name.into(),
                password_hash: hash.clone(),
                group: group.map(str::to_string),
                publish: None,
                subscribe: None,
                any_client_id: any,
            };
        config.local.groups.push(crate::config::GroupConfig {
            name: "free".into(),
            publish: None,
            subscribe: None,
            any_client_id: true,
        });
        config.local.devices.push(device("strict", None, None));
        config.local.devices.push(device("app", None, Some(true)));
        config
            .local
            .devices
            .push(device("member", Some("free"), None));
        config
            .local
            .devices
            .push(device("optout", Some("free"), Some(false)));
        let auth = Auth::from_config(&config, &routes);
        let login = |id: &str, user: &str| auth.authenticate(id, Some(user), Some(b"pw"), None);
        assert_eq!(login("strict", "strict"), AuthVerdict::Allow);
        assert_eq!(login("paho123", "strict"), AuthVerdict::ClientIdNotAllowed);
        assert_eq!(login("paho123", "app"), AuthVerdict::Allow);
        assert_eq!(login("Cab iPad 3", "member"), AuthVerdict::Allow);
        assert_eq!(login("paho123", "optout"), AuthVerdict::ClientIdNotAllowed);
        // Another device's ids stay its own, whatever any_client_id says.
        assert_eq!(login("strict", "app"), AuthVerdict::ClientIdNotAllowed);
        assert_eq!(
            login("strict-web", "member"),
            AuthVerdict::ClientIdNotAllowed
        );
        assert_eq!(login("app", "member"), AuthVerdict::ClientIdNotAllowed);
        // A wrong password is still a wrong password.
        assert_eq!(
            auth.authenticate("paho123", Some("app"), Some(b"no"), None),
            AuthVerdict::BadCredentials
        );
    }

    #[test]
    fn client_id_ownership() {
        assert!(owns_client_id("ipad1", "ipad1"));
        assert!(owns_client_id("ipad1", "ipad1-web"));
        assert!(!owns_client_id("ipad1", "ipad10"));
        assert!(!owns_client_id("ipad1", "ipad2"));
    }
}
