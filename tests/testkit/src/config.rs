//! The one builder of relay configurations for tests. Every test config starts from the same
//! defaults — the iPads' listener on `{local_port}`, the central broker's URL, a 5 s
//! keep-alive and quick backoff (100 ms … 1 s), the status socket in the relay's directory —
//! and says only what it changes. `{local_port}` and `{dir}` are filled in by
//! [`crate::Relay::start`] and [`crate::ops::Daemon::spawn`].

/// A relay configuration under construction: sections of `key = value` lines (a key set
/// again replaces its value), then routes, then raw text.
#[derive(Debug, Clone)]
pub struct Config {
    train_id: String,
    sections: Vec<(String, Vec<(String, String)>)>,
    routes: Vec<String>,
    tail: String,
}

impl Config {
    /// The shared defaults with the central broker at `central_url`; no `[store]` section
    /// (the store goes to the daemon's default path, inside the relay's directory) and no
    /// routes (the built-in ones apply unless routes are added).
    pub fn new(central_url: &str) -> Config {
        Config {
            train_id: "T1".into(),
            sections: Vec::new(),
            routes: Vec::new(),
            tail: String::new(),
        }
        .set("local", "listen", "\"127.0.0.1:{local_port}\"")
        .set("uplink", "url", &format!("\"{central_url}\""))
        .set("uplink", "keep_alive", "\"5s\"")
        .set("uplink", "backoff_min", "\"100ms\"")
        .set("uplink", "backoff_max", "\"1s\"")
        .set("status", "socket", "\"{dir}/status.sock\"")
    }

    /// `[section] key = value`, `value` as TOML (strings quoted); replaces an earlier value.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Config {
        let at = match self.sections.iter().position(|(s, _)| s == section) {
            Some(at) => at,
            None => {
                self.sections.push((section.to_string(), Vec::new()));
                self.sections.len() - 1
            }
        };
        let keys = &mut self.sections[at].1;
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => keys.push((key.to_string(), value.to_string())),
        }
        self
    }

    /// Several `key = value` lines for `section` at once (blank lines ignored); from a line
    /// that opens a table (`[[local.device]]`, ...) on, the text goes to the end as it is.
    pub fn lines(mut self, section: &str, lines: &str) -> Config {
        let (keys, tables) = match lines.find("\n[").map(|i| i + 1) {
            Some(at) => lines.split_at(at),
            None if lines.trim_start().starts_with('[') => ("", lines),
            None => (lines, ""),
        };
        if !tables.is_empty() {
            self = self.append(tables);
        }
        for line in keys.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not a `key = value` line for [{section}]: {line:?}"));
            self = self.set(section, key.trim(), value.trim());
        }
        self
    }

    /// A `[store]` section in the relay's directory, with `extra` lines.
    pub fn store(self, extra: &str) -> Config {
        self.set("store", "path", "\"{dir}/store.db\"")
            .lines("store", extra)
    }

    /// A `[[route]]`: `direction` "up" or "down", with its local and remote filters.
    pub fn route(mut self, direction: &str, local: &str, remote: &str) -> Config {
        self.routes.push(format!(
            "[[route]]\ndirection = \"{direction}\"\nlocal = \"{local}\"\nremote = \"{remote}\"\n"
        ));
        self
    }

    /// The routes most tests use: `up/#` up to `trains/T1/up/#`, `trains/T1/down/#` down to
    /// `down/#`, and `fleet/broadcast/#` down as it is.
    pub fn standard_routes(self) -> Config {
        self.route("up", "up/#", "trains/T1/up/#")
            .route("down", "down/#", "trains/T1/down/#")
            .route("down", "fleet/broadcast/#", "fleet/broadcast/#")
    }

    /// Raw TOML after everything else (more routes with keys of their own, device tables).
    pub fn append(mut self, raw: &str) -> Config {
        self.tail.push_str(raw);
        self.tail.push('\n');
        self
    }

    pub fn build(&self) -> String {
        let mut out = format!("train_id = \"{}\"\n", self.train_id);
        for (section, keys) in &self.sections {
            out.push_str(&format!("\n[{section}]\n"));
            for (key, value) in keys {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        for route in &self.routes {
            out.push('\n');
            out.push_str(route);
        }
        out.push('\n');
        out.push_str(&self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_set_again_replaces_its_value() {
        let text = Config::new("mqtt://h:1")
            .lines("uplink", "keep_alive = \"2s\"\nconnections = 4")
            .store("max_bytes = \"1MiB\"")
            .route("up", "a/#", "b/#")
            .build();
        let parsed: toml_free::Lines = toml_free::Lines::from(&text);
        assert_eq!(parsed.get("uplink", "keep_alive"), Some("\"2s\""));
        assert_eq!(parsed.get("uplink", "connections"), Some("4"));
        assert_eq!(parsed.count("keep_alive"), 1);
        assert_eq!(parsed.get("store", "max_bytes"), Some("\"1MiB\""));
        assert!(text.contains("[[route]]\ndirection = \"up\"\nlocal = \"a/#\""));
    }

    #[test]
    fn tables_among_section_lines_go_to_the_end() {
        let text = Config::new("mqtt://h:1")
            .lines(
                "local",
                "allow_anonymous = true\n[[local.device]]\nname = \"d\"\n",
            )
            .store("")
            .build();
        let device = text
            .find("[[local.device]]\nname = \"d\"")
            .expect("device table");
        assert!(device > text.find("[store]").expect("store"));
        assert!(
            text.contains("[local]\nlisten = \"127.0.0.1:{local_port}\"\nallow_anonymous = true\n")
        );
    }

    /// Just enough of a reader to check the builder's output in its own terms.
    mod toml_free {
        pub struct Lines(Vec<(String, String, String)>);

        impl Lines {
            pub fn from(text: &str) -> Lines {
                let mut section = String::new();
                let mut out = Vec::new();
                for line in text.lines() {
                    if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                        section = s.to_string();
                    } else if let Some((k, v)) = line.split_once(" = ") {
                        out.push((section.clone(), k.to_string(), v.to_string()));
                    }
                }
                Lines(out)
            }

            pub fn get(&self, section: &str, key: &str) -> Option<&str> {
                self.0
                    .iter()
                    .find(|(s, k, _)| s == section && k == key)
                    .map(|(_, _, v)| v.as_str())
            }

            pub fn count(&self, key: &str) -> usize {
                self.0.iter().filter(|(_, k, _)| k == key).count()
            }
        }
    }
}
