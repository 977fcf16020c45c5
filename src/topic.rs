//! Topic names and filters: validation and matching (MQTT 3.1.1 §4.7, MQTT 5 §4.7).

use thiserror::Error;

/// Why a topic name or filter is not valid.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("is empty")]
    Empty,
    #[error("is longer than 65535 bytes")]
    TooLong,
    #[error("contains a NUL character")]
    Nul,
    #[error("a topic name must not contain wildcards ('+' or '#')")]
    WildcardInName,
    #[error("'#' must be the last level, alone (as in 'a/#')")]
    MisplacedHash,
    #[error("'+' must occupy a whole level (as in 'a/+/b')")]
    MisplacedPlus,
}

/// Turns a client id into exactly one topic level, for every place that puts a client id into
/// a topic or filter (device topics, `{client_id}` in ACLs, presence upstream).
///
/// MQTT allows any UTF-8 client id, but `/` would split the level, `+` and `#` are wildcards in
/// a filter, and a space breaks some central brokers (NATS closes the connection on it). These
/// bytes, and `%` itself so that the mapping stays one-to-one, are percent-encoded as `%XX`
/// (uppercase hex of each UTF-8 byte): `a/b` becomes `a%2Fb`, which no other id maps to (`a_b`
/// stays `a_b`). Control characters are encoded too, though the broker refuses ids with them.
/// Everything else, non-ASCII letters included, is kept: `iPad von Jürg` becomes
/// `iPad%20von%20Jürg`. The common ids (`ipad-3`, `T1.cab`) are returned unchanged.
pub fn id_level(id: &str) -> std::borrow::Cow<'_, str> {
    let special = |c: char| matches!(c, '%' | '/' | '+' | '#' | ' ') || c.is_control();
    if !id.contains(special) {
        return std::borrow::Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() + 8);
    for c in id.chars() {
        if special(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Checks a topic name as used in PUBLISH.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter as used in SUBSCRIBE and in route configuration.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != last) {
            return Err(TopicError::MisplacedHash);
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::MisplacedPlus);
        }
    }
    Ok(())
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > 65535 {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// True if the (valid) topic name matches the (valid) filter. Names starting with `$` are not
/// matched by a filter starting with a wildcard.
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True if every topic name the (valid) filter `inner` can match is also matched by the (valid)
/// filter `outer`. Used by the ACL: a subscription is allowed only if one allowed filter covers
/// it, so `#` is not allowed just because `down/#` is. `$`-topics follow [`matches`]: a filter
/// starting with a wildcard matches none of them, so `#` does not cover `$SYS/x`, and `+/x`
/// covers `+/x` but not `$SYS/x`.
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    let mut first = true;
    loop {
        match (o.next(), i.next()) {
            // A wildcard at the first level matches no `$` topic, a literal `$...` level of
            // `inner` selects only `$` topics.
            (Some("#" | "+"), Some(il)) if first && il.starts_with('$') => return false,
            (Some("#"), _) => return true,
            // `inner` ends; `outer` must also match exactly here, or continue with `/#`
            // (which matches its parent level too).
            (Some(ol), None) => return ol == "#" && o.next().is_none(),
            (None, None) => return true,
            (None, Some(_)) => return false,
            // `inner` matches any depth from here; only `#` in `outer` does, or `+/#` at
            // the first level (a topic has at least one level, so that is `#` again).
            (Some("+"), Some("#")) => return first && o.next() == Some("#") && o.next().is_none(),
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(ol), Some(il)) if ol == il && il != "+" => {}
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn id_level_is_one_level_and_one_to_one() {
        use super::id_level;
        assert_eq!(id_level("ipad-3"), "ipad-3");
        assert_eq!(id_level("a/b"), "a%2Fb");
        assert_eq!(id_level("a_b"), "a_b");
        assert_eq!(id_level("+"), "%2B");
        assert_eq!(id_level("#"), "%23");
        assert_eq!(id_level("50%"), "50%25");
        assert_eq!(id_level("a%2Fb"), "a%252Fb");
        assert_eq!(id_level("Cab iPad 3"), "Cab%20iPad%203");
        assert_eq!(id_level("iPad von Jürg"), "iPad%20von%20Jürg");
        for id in ["a/b", "+", "#", "x y", "/", "%", "a\u{85}b"] {
            let l = id_level(id);
            assert!(!l.contains(['/', '+', '#', ' ']), "{id:?} -> {l}");
            assert!(super::validate_name(&l).is_ok());
        }
    }

    use super::*;

    #[test]
    fn filters() {
        for ok in [
            "a", "a/b", "#", "+", "a/#", "+/+/#", "/", "a//b", "+/", "Ü/x",
        ] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_filter("up/#/x"), Err(TopicError::MisplacedHash));
        assert_eq!(validate_filter("a#"), Err(TopicError::MisplacedHash));
        assert_eq!(validate_filter("a+/b"), Err(TopicError::MisplacedPlus));
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
    }

    #[test]
    fn matching() {
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("+/+", "/x"));
        assert!(matches("#", "x/y"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("a/+/c", "a//c"));
    }

    #[test]
    fn covering() {
        let yes = [
            ("#", "#"),
            ("#", "a/b"),
            ("#", "+/+"),
            ("#", "a/#"),
            ("+/#", "#"),
            ("a/#", "a"),
            ("a/#", "a/#"),
            ("a/#", "a/+/c"),
            ("a/#", "a/b/#"),
            ("a/+", "a/b"),
            ("a/+", "a/+"),
            ("+/b", "a/b"),
            ("+/+", "+/b"),
            ("a/b", "a/b"),
            ("a//b", "a//b"),
            ("a/+/b", "a//b"),
            ("$SYS/#", "$SYS/x/y"),
            ("$SYS/#", "$SYS/+"),
            ("+/x", "+/x"),
            ("down/device/ipad1/#", "down/device/ipad1"),
            ("Ü/#", "Ü/x"),
        ];
        for (o, i) in yes {
            assert!(covers(o, i), "{o} should cover {i}");
        }
        let no = [
            ("a/#", "#"),
            ("a/+/#", "a/#"),
            ("a/#", "+"),
            ("a/#", "+/b"),
            ("a/#", "b"),
            ("a/#", "ab"),
            ("a/+", "a"),
            ("a/+", "a/#"),
            ("a/+", "a/b/c"),
            ("a/+", "+/b"),
            ("a/b", "a/+"),
            ("a/b", "a/b/c"),
            ("a/b", "a"),
            ("a/b", "a/#"),
            ("a/+/#", "a"),
            ("#", "$SYS/x"),
            ("#", "$SYS/#"),
            ("+/x", "$SYS/x"),
            ("+/#", "$SYS"),
            ("down/#", "#"),
            ("down/#", "+/speed"),
            ("fleet/broadcast/#", "fleet/#"),
            ("down/device/ipad1/#", "down/device/+/x"),
            ("down/device/ipad1/#", "down/device/#"),
        ];
        for (o, i) in no {
            assert!(!covers(o, i), "{o} must not cover {i}");
        }
    }

    /// `covers(o, i)` implies every name matched by `i` is matched by `o`, checked on a small
    /// alphabet of levels exhaustively.
    #[test]
    fn covering_agrees_with_matching() {
        let levels = ["a", "b", "", "$s"];
        let mut names = Vec::new();
        for n in 1..=3 {
            let mut idx = vec![0usize; n];
            loop {
                names.push(idx.iter().map(|&k| levels[k]).collect::<Vec<_>>().join("/"));
                let mut pos = 0;
                while pos < n {
                    idx[pos] += 1;
                    if idx[pos] < levels.len() {
                        break;
                    }
                    idx[pos] = 0;
                    pos += 1;
                }
                if pos == n {
                    break;
                }
            }
        }
        let flevels = ["a", "b", "$s", "+"];
        let mut filters = vec!["#".to_string()];
        for n in 1..=3 {
            let mut idx = vec![0usize; n];
            loop {
                let base: Vec<&str> = idx.iter().map(|&k| flevels[k]).collect();
                filters.push(base.join("/"));
                filters.push(format!("{}/#", base.join("/")));
                let mut pos = 0;
                while pos < n {
                    idx[pos] += 1;
                    if idx[pos] < flevels.len() {
                        break;
                    }
                    idx[pos] = 0;
                    pos += 1;
                }
                if pos == n {
                    break;
                }
            }
        }
        for o in &filters {
            for i in &filters {
                let semantic = names
                    .iter()
                    .filter(|n| matches(i, n))
                    .all(|n| matches(o, n));
                if covers(o, i) {
                    assert!(semantic, "covers({o}, {i}) but a name of {i} escapes {o}");
                }
                // On names of up to 3 levels, a filter with more levels is not fully
                // sampled; compare only where both are short enough to be decided.
                let short = |f: &str| f.split('/').count() <= 2;
                if semantic && short(o) && short(i) && names.iter().any(|n| matches(i, n)) {
                    assert!(
                        covers(o, i),
                        "{o} covers {i} on every sample, covers() says no"
                    );
                }
            }
        }
    }
}
