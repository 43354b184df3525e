//! Request matching for one HTTPMatchRequest block, with Envoy's semantics:
//! regexes match the whole string, header values of repeated headers are
//! joined with `,`, a missing header counts as empty for `withoutHeaders`.

use http::Method;
use http::header::{HeaderMap, HeaderName};
use regex::Regex;

/// What matching needs to see of a request.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    /// Host or `:authority`, as sent (may carry a port).
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// The listener port the request arrived on.
    pub port: u16,
}

#[derive(Debug, Clone)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    /// Anchored: must match the whole value.
    Regex(Regex),
    /// `{}`: the header or parameter is present, whatever its value.
    Present,
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatcher::Exact(s) => value == s,
            StringMatcher::Prefix(p) => value.starts_with(p.as_str()),
            StringMatcher::Regex(re) => re.is_match(value),
            StringMatcher::Present => true,
        }
    }

    /// Compiles `pattern` as a full-string match.
    pub fn regex(pattern: &str) -> Result<Regex, regex::Error> {
        anchored_regex(pattern)
    }
}

/// Compiles a pattern so that it must match the entire input, with a bound on
/// its compiled size (a config can't make the proxy build a huge automaton).
pub fn anchored_regex(pattern: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$")).size_limit(REGEX_SIZE_LIMIT).build()
}

/// Upper bound on a compiled route regex; validation enforces the same bound.
pub use crate::config::validate::REGEX_SIZE_LIMIT;

#[derive(Debug, Clone)]
pub enum PathMatch {
    /// No `uri` condition: Envoy's implicit `prefix: /`.
    Any,
    Exact {
        value: String,
        ignore_case: bool,
    },
    Prefix {
        value: String,
        ignore_case: bool,
    },
    Regex(Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Any => true,
            PathMatch::Exact { value, ignore_case: false } => path == value,
            PathMatch::Exact { value, ignore_case: true } => path.eq_ignore_ascii_case(value),
            PathMatch::Prefix { value, ignore_case: false } => path.starts_with(value.as_str()),
            PathMatch::Prefix { value, ignore_case: true } => {
                path.len() >= value.len()
                    && path.is_char_boundary(value.len())
                    && path[..value.len()].eq_ignore_ascii_case(value)
            }
            PathMatch::Regex(re) => re.is_match(path),
        }
    }

    /// How much of `path` counts as "the matched prefix" for `rewrite.uri` and
    /// `redirect.prefixRewrite`: the prefix for prefix matches, `/` for the
    /// implicit catch-all, the whole path for exact and regex matches.
    pub fn prefix_len(&self, path: &str) -> usize {
        let n = match self {
            PathMatch::Any => usize::from(path.starts_with('/')),
            PathMatch::Prefix { value, .. } => value.len(),
            PathMatch::Exact { .. } | PathMatch::Regex(_) => path.len(),
        };
        n.min(path.len())
    }
}

#[derive(Debug, Clone)]
pub struct HeaderCondition {
    pub name: HeaderName,
    pub matcher: StringMatcher,
    /// From `withoutHeaders`.
    pub invert: bool,
}

#[derive(Debug, Clone)]
pub struct QueryCondition {
    pub name: String,
    pub matcher: StringMatcher,
}

/// One HTTPMatchRequest: every condition must hold.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub method: Option<StringMatcher>,
    pub authority: Option<StringMatcher>,
    pub scheme: Option<StringMatcher>,
    pub headers: Vec<HeaderCondition>,
    pub query: Vec<QueryCondition>,
}

impl Default for RouteMatch {
    fn default() -> Self {
        RouteMatch { path: PathMatch::Any, method: None, authority: None, scheme: None, headers: vec![], query: vec![] }
    }
}

impl RouteMatch {
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if !self.path.matches(req.path) {
            return false;
        }
        if let Some(m) = &self.method
            && !m.matches(req.method.as_str())
        {
            return false;
        }
        if let Some(m) = &self.authority
            && !m.matches(req.authority)
        {
            return false;
        }
        if let Some(m) = &self.scheme
            && !m.matches(req.scheme)
        {
            return false;
        }
        for h in &self.headers {
            if header_matches(req.headers, h) == h.invert {
                return false;
            }
        }
        for q in &self.query {
            match query_value(req.query, &q.name) {
                Some(v) => {
                    if !q.matcher.matches(&v) {
                        return false;
                    }
                }
                None => return false,
            }
        }
        true
    }
}

fn header_matches(headers: &HeaderMap, cond: &HeaderCondition) -> bool {
    let mut values = headers.get_all(&cond.name).iter();
    let Some(first) = values.next() else {
        // Missing: never matches a positive condition; for withoutHeaders Envoy
        // treats it as an empty value.
        return cond.invert && !matches!(cond.matcher, StringMatcher::Present) && cond.matcher.matches("");
    };
    let Ok(first) = first.to_str() else { return false };
    match values.next() {
        None => cond.matcher.matches(first),
        Some(second) => {
            let mut joined = String::from(first);
            for v in std::iter::once(second).chain(values) {
                joined.push(',');
                joined.push_str(v.to_str().unwrap_or(""));
            }
            cond.matcher.matches(&joined)
        }
    }
}

/// The first value of query parameter `name` (`?a` has the value `""`),
/// percent-decoded.
pub fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    let query = query?;
    for pair in query.split('&') {
        let (k, v) = match pair.split_once('=') {
            Some((k, v)) => (k, v),
            None => (pair, ""),
        };
        if percent_decode(k) == name {
            return Some(percent_decode(v));
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    if !s.contains(['%', '+']) {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(path: &'a str, query: Option<&'a str>, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView { path, query, method: &Method::GET, authority: "svc:80", scheme: "http", headers, port: 80 }
    }

    #[test]
    fn regex_is_anchored() {
        let re = anchored_regex(r"\d+").unwrap();
        assert!(re.is_match("123"));
        assert!(!re.is_match("a123"));
    }

    #[test]
    fn prefix_ignore_case() {
        let m = PathMatch::Prefix { value: "/API".into(), ignore_case: true };
        assert!(m.matches("/api/v1"));
        assert!(!m.matches("/ap"));
    }

    #[test]
    fn without_headers_missing_is_empty() {
        let h = HeaderMap::new();
        let cond = HeaderCondition {
            name: HeaderName::from_static("x"),
            matcher: StringMatcher::Exact("foo".into()),
            invert: true,
        };
        let m = RouteMatch { headers: vec![cond], ..Default::default() };
        assert!(m.matches(&view("/", None, &h)));
        let present =
            HeaderCondition { name: HeaderName::from_static("x"), matcher: StringMatcher::Present, invert: true };
        let m = RouteMatch { headers: vec![present], ..Default::default() };
        assert!(m.matches(&view("/", None, &h)));
    }

    #[test]
    fn repeated_headers_are_joined() {
        let mut h = HeaderMap::new();
        h.append("x", "a".parse().unwrap());
        h.append("x", "b".parse().unwrap());
        let cond = HeaderCondition {
            name: HeaderName::from_static("x"),
            matcher: StringMatcher::Exact("a,b".into()),
            invert: false,
        };
        let m = RouteMatch { headers: vec![cond], ..Default::default() };
        assert!(m.matches(&view("/", None, &h)));
    }

    #[test]
    fn query_values() {
        assert_eq!(query_value(Some("a=1&b"), "b").as_deref(), Some(""));
        assert_eq!(query_value(Some("a=1&b=2"), "a").as_deref(), Some("1"));
        assert_eq!(query_value(Some("n=a%20b+c"), "n").as_deref(), Some("a b c"));
        assert_eq!(query_value(Some("n=%2"), "n").as_deref(), Some("%2"));
        assert_eq!(query_value(None, "a"), None);
    }
}
