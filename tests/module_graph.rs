//! The modules of `src/` use each other in one direction only: no module uses another that
//! (directly or through others) uses it back. A circle makes the modules one unit in practice,
//! so none of them can be understood, tested or changed alone.
//!
//! The graph is read from the sources: every `crate::a::b` path (in `use` lines, grouped
//! `use crate::{...}` lists, and inline paths) counts as a use of module `a`, or of `a/b` for
//! the modules whose submodules are tracked one by one (`uplink`, `status`). Test code
//! (`#[cfg(test)] mod ... { }`) and comments are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules whose submodules are nodes of their own.
const SPLIT: &[&str] = &["uplink", "status"];

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file below `src/`: `uplink/mod.rs` -> `["uplink"]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("file below src");
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The graph node a module path belongs to (`None`: the crate root).
fn node(path: &[String], src: &Path) -> Option<String> {
    let top = path.first()?;
    if top == "lib" || top == "main" {
        return None;
    }
    if SPLIT.contains(&top.as_str()) {
        if let Some(sub) = path.get(1) {
            let dir = src.join(top);
            if dir.join(format!("{sub}.rs")).exists() || dir.join(sub).join("mod.rs").exists() {
                return Some(format!("{top}/{sub}"));
            }
        }
    }
    Some(top.clone())
}

/// The text without comments, string literals and `#[cfg(test)]` modules.
fn production_code(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |e| e + 2);
        } else if let Some(raw) = rest.strip_prefix("r#\"") {
            // A raw string: up to its closing `"#`.
            i += 3 + raw.find("\"#").map_or(raw.len(), |e| e + 2);
            out.push_str("\"\"");
        } else if rest.starts_with('\'')
            && (rest.get(2..3) == Some("'")
                || (rest.get(1..2) == Some("\\") && rest.get(3..4) == Some("'")))
        {
            // A character literal such as '"' or '\'' (a lifetime has no closing quote).
            let len = if rest.get(2..3) == Some("'") { 3 } else { 4 };
            out.push_str("' '");
            i += len;
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() {
                match rest.as_bytes()[j] {
                    b'\\' => j += 2,
                    b'"' => break,
                    _ => j += 1,
                }
            }
            out.push_str("\"\"");
            i += (j + 1).min(rest.len());
        } else if let Some(after) = rest.strip_prefix("#[cfg(test)]") {
            // Skips the item that follows when it is a module with a body.
            let item = after.trim_start();
            let is_mod = item.starts_with("mod ") || item.starts_with("pub(crate) mod ");
            match (is_mod, item.find(['{', ';'])) {
                (true, Some(open)) if item.as_bytes()[open] == b'{' => {
                    let start = i + (rest.len() - item.len()) + open;
                    let mut depth = 0usize;
                    let mut j = start;
                    while j < bytes.len() {
                        match bytes[j] {
                            b'{' => depth += 1,
                            b'}' => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        j += 1;
                    }
                    i = j + 1;
                }
                _ => {
                    out.push_str("#[cfg(test)]");
                    i += "#[cfg(test)]".len();
                }
            }
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The paths a `{...}` group of a `use` expands to, each as its segments.
fn expand_group(prefix: &[String], group: &str, out: &mut Vec<Vec<String>>) {
    let mut depth = 0;
    let mut start = 0;
    let mut items = Vec::new();
    for (k, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..k]);
                start = k + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    for item in items {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let mut path = prefix.to_vec();
        let (head, nested) = match item.find('{') {
            Some(open) => (
                &item[..open],
                Some(&item[open + 1..item.rfind('}').unwrap_or(item.len())]),
            ),
            None => (item, None),
        };
        let head = head.split(" as ").next().unwrap_or(head);
        path.extend(
            head.split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty() && *s != "self" && *s != "*")
                .map(String::from),
        );
        match nested {
            Some(g) => expand_group(&path, g, out),
            None => out.push(path),
        }
    }
}

/// Every module path named after `crate::` in `code`.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(pos) = code[from..].find("crate::") {
        let at = from + pos;
        from = at + "crate::".len();
        if at > 0 && (is_ident(bytes[at - 1]) || bytes[at - 1] == b'$') {
            continue;
        }
        let rest = &code[from..];
        if rest.starts_with('{') {
            let mut depth = 0;
            let mut end = rest.len();
            for (k, c) in rest.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = k;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            expand_group(&[], &rest[1..end], &mut out);
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let path = rest[..end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect::<Vec<_>>();
            let path = if rest[end..].starts_with('{') {
                let mut nested = Vec::new();
                let close = rest[end..].find('}').map_or(rest.len(), |c| end + c);
                expand_group(&path, &rest[end + 1..close], &mut nested);
                out.extend(nested);
                continue;
            } else {
                path
            };
            out.push(path);
        }
    }
    out
}

/// The text of a `{...}` group that `rest` starts with, without its braces.
fn group(rest: &str) -> &str {
    let mut depth = 0;
    for (k, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &rest[1..k];
                }
            }
            _ => {}
        }
    }
    &rest[1..]
}

/// The paths named by `rest` (what follows `prefix::` in the code), below `prefix`.
fn follow(prefix: &[String], rest: &str, out: &mut Vec<Vec<String>>) {
    if rest.starts_with('{') {
        expand_group(prefix, group(rest), out);
        return;
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    let mut path = prefix.to_vec();
    path.extend(
        rest[..end]
            .split("::")
            .filter(|s| !s.is_empty())
            .map(String::from),
    );
    out.push(path);
}

/// `super::x` and (in a `mod.rs`) `self::x` or `x::` for a declared child module `x`, as
/// crate paths.
fn relative_paths(code: &str, module: &[String], children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let words: Vec<(usize, &str)> = code
        .match_indices(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .scan(0usize, |start, (k, _)| {
            let w = (*start, &code[*start..k]);
            *start = k + 1;
            Some(w)
        })
        .filter(|(_, w)| !w.is_empty())
        .collect();
    for (k, w) in words {
        if !code[k + w.len()..].starts_with("::") {
            continue;
        }
        let preceded_by_path = k >= 2 && &code[k - 2..k] == "::";
        if preceded_by_path {
            continue;
        }
        let mut rest = &code[k + w.len() + 2..];
        if w == "super" {
            let mut up = 1;
            while let Some(r) = rest.strip_prefix("super::") {
                up += 1;
                rest = r;
            }
            if module.len() > up {
                follow(&module[..module.len() - up], rest, &mut out);
            }
        } else if w == "self" && !children.is_empty() {
            follow(module, rest, &mut out);
        } else if children.contains(w) {
            follow(module, &code[k..], &mut out);
        }
    }
    out
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in &files {
        let module = module_path(&src, file);
        let Some(from) = node(&module, &src) else {
            continue;
        };
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let code = production_code(&text);
        let children: BTreeSet<String> = if file.ends_with("mod.rs") {
            code.lines()
                .filter_map(|l| {
                    let l = l.trim();
                    let l = l.strip_prefix("pub ").unwrap_or(l);
                    let l = l.strip_prefix("pub(crate) ").unwrap_or(l);
                    l.strip_prefix("mod ")?.strip_suffix(';').map(String::from)
                })
                .collect()
        } else {
            BTreeSet::new()
        };
        let uses = graph.entry(from.clone()).or_default();
        for path in crate_paths(&code)
            .into_iter()
            .chain(relative_paths(&code, &module, &children))
        {
            if let Some(to) = node(&path, &src) {
                if to != from {
                    uses.insert(to);
                }
            }
        }
    }
    graph
}

/// A circle through `start`, if there is one: `start -> ... -> start`.
fn circle_through(graph: &Graph, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == start {
                let mut circle = path.clone();
                circle.push(start.to_string());
                return Some(circle);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

#[test]
fn modules_use_each_other_in_one_direction_only() {
    let graph = graph();
    assert!(
        graph.contains_key("config") && graph.contains_key("uplink/link"),
        "the module graph looks empty: {graph:?}"
    );
    for (module, uses) in &graph {
        let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
        eprintln!("{module} -> {}", uses.join(", "));
    }
    let mut circles = BTreeSet::new();
    for module in graph.keys() {
        if let Some(circle) = circle_through(&graph, module) {
            // One report per circle, whichever module it was found from.
            let mut key: Vec<String> = circle[..circle.len() - 1].to_vec();
            key.sort();
            if circles.insert(key) {
                eprintln!("circle: {}", circle.join(" -> "));
            }
        }
    }
    assert!(
        circles.is_empty(),
        "modules that use each other in a circle (see above): {circles:?}"
    );
}

#[test]
fn the_reader_sees_every_form_of_use() {
    let code = production_code(
        "use crate::a::B;\nuse crate::{b, c::{D, e::F}};\n// crate::x::y\nfn f() { crate::g::h(); \"crate::s\"; '\"'; crate::i::j(); }\n#[cfg(test)]\nmod tests { use crate::t; }\n",
    );
    let found: BTreeSet<String> = crate_paths(&code)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let expected: BTreeSet<String> = ["a::B", "b", "c::D", "c::e::F", "g::h", "i::j"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, expected);

    let module = ["uplink".to_string(), "link".to_string()];
    let found: BTreeSet<String> = relative_paths(
        "use super::{wire::{self, X}, error::E};\nuse super::transport::Io;\n",
        &module,
        &BTreeSet::new(),
    )
    .into_iter()
    .map(|p| p.join("::"))
    .collect();
    let expected: BTreeSet<String> = [
        "uplink::wire",
        "uplink::wire::X",
        "uplink::error::E",
        "uplink::transport::Io",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(found, expected);
}
