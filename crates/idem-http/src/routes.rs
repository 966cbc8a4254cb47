//! Per-route rules: settings that differ by path and method, the first matching rule winning.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use idem_core::Engine;

use crate::{IdempotencyConfig, UnknownOutcome};

/// Which requests a [`RouteRule`] applies to: a path (a prefix, or a pattern of segments) and,
/// optionally, methods.
///
/// Paths are compared after resolving `.` and `..` segments and empty segments (`//`), so
/// `/v1/payments/../refunds` is matched as `/v1/refunds`; percent-encoding is compared as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    path: PathMatch,
    methods: Option<Vec<Method>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathMatch {
    /// Whole segments: `/v1/payments` matches `/v1/payments` and `/v1/payments/7`, never
    /// `/v1/paymentsx`.
    Prefix(Vec<String>),
    /// Segment by segment: `*` is any one segment; a last `**` is any number of them (none
    /// included).
    Pattern(Vec<String>),
}

/// Why a path or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(String);

impl RouteMatch {
    /// Requests whose path starts with the whole segments of `prefix` (`/` matches every path).
    pub fn prefix(prefix: &str) -> Result<Self, RouteError> {
        let segments = parse_path("prefix", prefix)?;
        if segments.iter().any(|segment| segment.contains('*')) {
            return Err(RouteError(format!(
                "prefix {prefix:?}: `*` is for patterns; use `path` for a pattern"
            )));
        }
        Ok(Self { path: PathMatch::Prefix(segments), methods: None })
    }

    /// Requests whose path matches `pattern` segment by segment: `*` stands for one segment,
    /// and `**`, as the last segment only, for any number of them
    /// (`/v1/orders/*/refunds`, `/v1/admin/**`).
    pub fn pattern(pattern: &str) -> Result<Self, RouteError> {
        let segments = parse_path("path", pattern)?;
        for (index, segment) in segments.iter().enumerate() {
            let last = index + 1 == segments.len();
            let valid = match segment.as_str() {
                "*" => true,
                "**" => last,
                other => !other.contains('*'),
            };
            if !valid {
                return Err(RouteError(format!(
                    "path {pattern:?}: `*` must be a whole segment, and `**` only the last one"
                )));
            }
        }
        Ok(Self { path: PathMatch::Pattern(segments), methods: None })
    }

    /// Only requests of these methods (all methods when never called).
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = Some(methods.into_iter().collect());
        self
    }

    /// Whether a request with this method and path (the URI's path, without the query) is one
    /// this rule applies to.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        if let Some(methods) = &self.methods
            && !methods.contains(method)
        {
            return false;
        }
        let segments = resolve(path);
        match &self.path {
            PathMatch::Prefix(prefix) => {
                segments.len() >= prefix.len()
                    && prefix.iter().zip(&segments).all(|(want, got)| want == got)
            }
            PathMatch::Pattern(pattern) => matches_pattern(pattern, &segments),
        }
    }
}

fn parse_path(what: &str, text: &str) -> Result<Vec<String>, RouteError> {
    if !text.starts_with('/') {
        return Err(RouteError(format!("{what} {text:?} must start with `/`")));
    }
    if text.contains(['?', '#']) || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(RouteError(format!(
            "{what} {text:?} must be a plain path: no query, fragment, spaces or control characters"
        )));
    }
    let segments: Vec<&str> = text.split('/').filter(|segment| !segment.is_empty()).collect();
    if segments.iter().any(|segment| matches!(*segment, "." | "..")) {
        return Err(RouteError(format!("{what} {text:?} must not hold `.` or `..` segments")));
    }
    Ok(segments.into_iter().map(str::to_owned).collect())
}

/// The path's segments with empty, `.` and `..` segments resolved (`..` at the root stays at
/// the root), as a server normalising the path would see them.
fn resolve(path: &str) -> Vec<&str> {
    let mut segments = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    segments
}

fn matches_pattern(pattern: &[String], segments: &[&str]) -> bool {
    match pattern.split_first() {
        None => segments.is_empty(),
        Some((first, _)) if first == "**" => true,
        Some((first, rest)) => match segments.split_first() {
            Some((segment, remaining)) => {
                (first == "*" || first == segment) && matches_pattern(rest, remaining)
            }
            None => false,
        },
    }
}

/// Settings for the requests a [`RouteMatch`] selects; each one left unset keeps the layer's.
///
/// ```
/// use std::time::Duration;
/// use idem_http::{IdempotencyConfig, RouteMatch, RouteRule};
///
/// let config = IdempotencyConfig::default()
///     // Payments: a key is required, and replays last three days.
///     .route(RouteRule::new(RouteMatch::prefix("/v1/payments").unwrap())
///         .require_key(true)
///         .ttl(Duration::from_secs(72 * 3600)))
///     // Webhooks from a provider that never sends keys: no idempotency handling at all.
///     .route(RouteRule::new(RouteMatch::prefix("/webhooks").unwrap()).methods([]));
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RouteRule {
    pub matcher: RouteMatch,
    pub require_key: Option<bool>,
    /// How long this route's completed responses are replayed.
    pub ttl: Option<Duration>,
    /// Methods that get idempotency handling on this route; empty: none (every request
    /// passes straight through).
    pub methods: Option<Vec<Method>>,
    pub fingerprint_headers: Option<Vec<HeaderName>>,
    pub max_request_body: Option<usize>,
    pub max_stored_body: Option<usize>,
    pub unknown_outcome: Option<UnknownOutcome>,
}

impl RouteRule {
    pub fn new(matcher: RouteMatch) -> Self {
        Self {
            matcher,
            require_key: None,
            ttl: None,
            methods: None,
            fingerprint_headers: None,
            max_request_body: None,
            max_stored_body: None,
            unknown_outcome: None,
        }
    }

    pub fn require_key(mut self, require_key: bool) -> Self {
        self.require_key = Some(require_key);
        self
    }

    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = Some(methods.into_iter().collect());
        self
    }

    pub fn fingerprint_headers(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        self.fingerprint_headers = Some(headers.into_iter().collect());
        self
    }

    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = Some(bytes);
        self
    }

    pub fn max_stored_body(mut self, bytes: usize) -> Self {
        self.max_stored_body = Some(bytes);
        self
    }

    pub fn unknown_outcome(mut self, policy: UnknownOutcome) -> Self {
        self.unknown_outcome = Some(policy);
        self
    }

    /// The layer's settings with this rule's applied.
    fn apply(&self, base: &IdempotencyConfig) -> IdempotencyConfig {
        let mut config = base.clone();
        config.routes = Vec::new();
        if let Some(require_key) = self.require_key {
            config.require_key = require_key;
        }
        if let Some(methods) = &self.methods {
            config.methods = methods.clone();
        }
        if let Some(headers) = &self.fingerprint_headers {
            config.fingerprint_headers = headers.clone();
        }
        if let Some(bytes) = self.max_request_body {
            config.max_request_body = bytes;
        }
        if let Some(bytes) = self.max_stored_body {
            config.max_stored_body = bytes;
        }
        if let Some(policy) = self.unknown_outcome {
            config.unknown_outcome = policy;
        }
        config
    }
}

/// The settings and engine each request is handled with, chosen once per request.
#[derive(Debug)]
pub(crate) struct Routes {
    rules: Vec<(RouteMatch, Arc<IdempotencyConfig>, Engine)>,
    default: (Arc<IdempotencyConfig>, Engine),
}

impl Routes {
    pub(crate) fn new(engine: Engine, config: IdempotencyConfig) -> Self {
        let rules = config
            .routes
            .iter()
            .map(|rule| {
                let engine = match rule.ttl {
                    Some(ttl) => engine.with_ttl(ttl),
                    None => engine.clone(),
                };
                (rule.matcher.clone(), Arc::new(rule.apply(&config)), engine)
            })
            .collect();
        Self { rules, default: (Arc::new(config), engine) }
    }

    /// The first rule that matches, else the layer's own settings.
    pub(crate) fn select(&self, method: &Method, path: &str) -> (&Arc<IdempotencyConfig>, &Engine) {
        match self.rules.iter().find(|(matcher, _, _)| matcher.matches(method, path)) {
            Some((_, config, engine)) => (config, engine),
            None => (&self.default.0, &self.default.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        let rule = RouteMatch::prefix("/v1/payments").unwrap();
        for path in ["/v1/payments", "/v1/payments/", "/v1/payments/7", "//v1//payments/7/x"] {
            assert!(rule.matches(&Method::POST, path), "{path}");
        }
        for path in ["/v1/paymentsx", "/v1", "/", "/v2/payments", "/v1/payments/../refunds"] {
            assert!(!rule.matches(&Method::POST, path), "{path}");
        }
        assert!(RouteMatch::prefix("/").unwrap().matches(&Method::GET, "/anything/at/all"));
        // Dot segments are resolved first: this path names /v1/payments/7.
        assert!(rule.matches(&Method::POST, "/v1/other/../payments/./7"));
    }

    #[test]
    fn patterns_match_segment_by_segment() {
        let refunds = RouteMatch::pattern("/v1/orders/*/refunds").unwrap();
        assert!(refunds.matches(&Method::POST, "/v1/orders/42/refunds"));
        assert!(!refunds.matches(&Method::POST, "/v1/orders/42/refunds/1"));
        assert!(!refunds.matches(&Method::POST, "/v1/orders/refunds"));
        let admin = RouteMatch::pattern("/v1/admin/**").unwrap();
        for path in ["/v1/admin", "/v1/admin/", "/v1/admin/a/b/c"] {
            assert!(admin.matches(&Method::PATCH, path), "{path}");
        }
        assert!(!admin.matches(&Method::PATCH, "/v1/administrators"));
    }

    #[test]
    fn methods_narrow_a_match() {
        let rule = RouteMatch::prefix("/v1").unwrap().methods([Method::PATCH]);
        assert!(rule.matches(&Method::PATCH, "/v1/x"));
        assert!(!rule.matches(&Method::POST, "/v1/x"));
    }

    #[test]
    fn malformed_paths_are_refused_with_a_reason() {
        for (result, words) in [
            (RouteMatch::prefix("v1"), "must start with `/`"),
            (RouteMatch::prefix("/v1/*"), "use `path` for a pattern"),
            (RouteMatch::pattern("/v1/**/x"), "only the last"),
            (RouteMatch::pattern("/v1/a*"), "whole segment"),
            (RouteMatch::pattern("/v1/../x"), "`..`"),
            (RouteMatch::prefix("/v1?x=1"), "plain path"),
        ] {
            let error = result.unwrap_err().to_string();
            assert!(error.contains(words), "{error:?} should say {words:?}");
        }
    }
}
