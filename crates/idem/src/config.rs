//! `idem serve` settings: each from a flag, else an `IDEM_*` environment variable, else the
//! TOML file given by `--config`, else the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use http::{HeaderName, Method, Uri};
use idem_http::{RouteMatch, RouteRule, ScopeSource, UnknownOutcome};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// The flags of `idem serve`. None has a clap default, so that a value missing on the command
/// line and in the environment can still come from the config file.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// Base URL of the service to protect, e.g. http://127.0.0.1:3000
    #[arg(long, env = "IDEM_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// Address to accept client traffic on [default: 127.0.0.1:8080]
    #[arg(long, env = "IDEM_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address for /healthz and /metrics [default: 127.0.0.1:9080]
    #[arg(long, env = "IDEM_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Where records live: memory://, sqlite://PATH, postgres://..., redis://...
    /// [default: sqlite://idem.db]
    #[arg(long, env = "IDEM_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// How long a completed response is replayed, e.g. 24h, 90m [default: 24h]
    #[arg(long, env = "IDEM_TTL", value_name = "DURATION", allow_hyphen_values = true)]
    pub ttl: Option<String>,
    /// How long an in-flight claim holds without renewal [default: 30s]
    #[arg(long, env = "IDEM_LEASE", value_name = "DURATION", allow_hyphen_values = true)]
    pub lease: Option<String>,
    /// Refuse requests of the idempotent methods that carry no Idempotency-Key (400);
    /// --require-key=false turns off a `true` from the config file
    #[arg(long, env = "IDEM_REQUIRE_KEY", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", value_parser = clap::builder::BoolishValueParser::new())]
    pub require_key: Option<bool>,
    /// Methods that get idempotency handling, comma-separated [default: POST,PATCH]
    #[arg(long, env = "IDEM_METHODS", value_name = "LIST")]
    pub methods: Option<String>,
    /// Where the caller's identity is read from, the first present winning: header names, or
    /// cookie:NAME for one cookie; `none` for one shared scope. Hashed, never stored
    /// [default: authorization,cookie]
    #[arg(long, env = "IDEM_SCOPE_HEADER", value_name = "NAME")]
    pub scope_header: Option<String>,
    /// Extra request headers that are part of the fingerprint, comma-separated
    #[arg(long, env = "IDEM_FINGERPRINT_HEADERS", value_name = "LIST")]
    pub fingerprint_headers: Option<String>,
    /// Largest request body accepted, e.g. 10MiB [default: 10MiB]
    #[arg(long, env = "IDEM_MAX_REQUEST_BODY", value_name = "SIZE")]
    pub max_request_body: Option<String>,
    /// Largest response body stored for replay, e.g. 1MiB [default: 1MiB]
    #[arg(long, env = "IDEM_MAX_STORED_BODY", value_name = "SIZE")]
    pub max_stored_body: Option<String>,
    /// How long a client waits for the upstream's response; past it the client gets 504 and
    /// a keyed call goes on, its outcome stored for the retry [default: 60s]
    #[arg(
        long,
        env = "IDEM_UPSTREAM_TIMEOUT",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    pub upstream_timeout: Option<String>,
    /// The hard cap on an upstream call (and on silence in its response body); a keyed call
    /// past it is abandoned and its outcome is unknown [default: 10m]
    #[arg(
        long,
        env = "IDEM_UPSTREAM_ABANDON_AFTER",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    pub upstream_abandon_after: Option<String>,
    /// When the request was sent and the connection broke before a whole response (or the
    /// call was abandoned): hold the key with a stored 502 outcome-unknown until an operator
    /// releases it, or release it when its lease expires [default: hold]
    #[arg(long, env = "IDEM_UNKNOWN_OUTCOME", value_name = "hold|release")]
    pub unknown_outcome: Option<String>,
    /// The longest `Prefer: wait=N` honoured for a retry of a key in flight [default: 30s]
    #[arg(long, env = "IDEM_MAX_WAIT", value_name = "DURATION", allow_hyphen_values = true)]
    pub max_wait: Option<String>,
    /// Forward requests without idempotency when the store is unreachable (default: refuse
    /// with 503); --fail-open=false turns off a `true` from the config file
    #[arg(long, env = "IDEM_FAIL_OPEN", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL", value_parser = clap::builder::BoolishValueParser::new())]
    pub fail_open: Option<bool>,
    /// Most bytes of request bodies held in memory at once, all requests together; past it a
    /// request waits a second for room, then gets 503 [default: 1GiB]
    #[arg(long, env = "IDEM_MAX_BUFFERED_BODIES", value_name = "SIZE")]
    pub max_buffered_bodies: Option<String>,
    /// Grace before a request body must keep up the minimum rate [default: 10s]
    #[arg(
        long,
        env = "IDEM_REQUEST_BODY_TIMEOUT",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    pub request_body_timeout: Option<String>,
    /// The slowest a request body may arrive after the grace, per second, e.g. 1KiB
    /// [default: 1KiB]
    #[arg(long, env = "IDEM_REQUEST_BODY_MIN_RATE", value_name = "SIZE")]
    pub request_body_min_rate: Option<String>,
    /// Most client connections served at once [default: 10000]
    #[arg(long, env = "IDEM_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// How often expired records are swept [default: 60s]
    #[arg(long, env = "IDEM_SWEEP_INTERVAL", value_name = "DURATION", allow_hyphen_values = true)]
    pub sweep_interval: Option<String>,
    /// How long SIGTERM waits for in-flight requests to finish [default: 30s]
    #[arg(
        long,
        env = "IDEM_SHUTDOWN_TIMEOUT",
        value_name = "DURATION",
        allow_hyphen_values = true
    )]
    pub shutdown_timeout: Option<String>,
    /// A bearer token the admin listener asks for (except on /healthz); required when
    /// --admin-listen is not a loopback address. The operator page takes it once as
    /// `/?token=...` and keeps it in a cookie
    #[arg(long, env = "IDEM_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A key in flight longer than this is flagged as stuck on the operator page and in
    /// idem_keys_stuck [default: 1m]
    #[arg(long, env = "IDEM_STUCK_AFTER", value_name = "DURATION", allow_hyphen_values = true)]
    pub stuck_after: Option<String>,
    /// An application's outbox database (PostgreSQL, or sqlite://PATH) whose pending and
    /// parked events the operator page shows, with a retry action
    #[arg(long, env = "IDEM_OUTBOX_DATABASE", value_name = "URL")]
    pub outbox_database: Option<String>,
    /// The consumers' PostgreSQL database, whose dead letters (`idem_dead_letters`) the
    /// operator page shows
    #[arg(long, env = "IDEM_DEAD_LETTERS_DATABASE", value_name = "URL")]
    pub dead_letters_database: Option<String>,
    /// The broker those consumers read (`nats://`, `amqp://`, `redis://`): with it, the page
    /// can put a dead letter back on it
    #[arg(long, env = "IDEM_DEAD_LETTERS_BROKER", value_name = "URL")]
    pub dead_letters_broker: Option<String>,
    /// RabbitMQ only: the exchange dead letters go back through; the default ("") routes each
    /// to the queue named by its subject
    #[arg(long, env = "IDEM_DEAD_LETTERS_EXCHANGE", value_name = "NAME")]
    pub dead_letters_exchange: Option<String>,
    /// TOML file with any of these settings (keys as the flags, without the dashes prefix)
    #[arg(long, env = "IDEM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The config file: the same names as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    upstream: Option<String>,
    listen: Option<String>,
    admin_listen: Option<String>,
    store: Option<String>,
    ttl: Option<String>,
    lease: Option<String>,
    require_key: Option<bool>,
    methods: Option<Vec<String>>,
    scope_header: Option<String>,
    fingerprint_headers: Option<Vec<String>>,
    max_request_body: Option<Size>,
    max_stored_body: Option<Size>,
    max_buffered_bodies: Option<Size>,
    request_body_timeout: Option<String>,
    request_body_min_rate: Option<Size>,
    upstream_timeout: Option<String>,
    upstream_abandon_after: Option<String>,
    unknown_outcome: Option<String>,
    max_wait: Option<String>,
    fail_open: Option<bool>,
    max_connections: Option<usize>,
    sweep_interval: Option<String>,
    shutdown_timeout: Option<String>,
    admin_token: Option<String>,
    stuck_after: Option<String>,
    outbox_database: Option<String>,
    dead_letters_database: Option<String>,
    dead_letters_broker: Option<String>,
    dead_letters_exchange: Option<String>,
    /// `[[route]]` blocks, in order.
    #[serde(default)]
    route: Vec<FileRoute>,
}

/// One `[[route]]` block: which requests (a `prefix` or a `path` pattern, and optionally
/// `match-methods`), and the settings that differ for them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileRoute {
    prefix: Option<String>,
    path: Option<String>,
    match_methods: Option<Vec<String>>,
    require_key: Option<bool>,
    ttl: Option<String>,
    methods: Option<Vec<String>>,
    fingerprint_headers: Option<Vec<String>>,
    max_request_body: Option<Size>,
    max_stored_body: Option<Size>,
    unknown_outcome: Option<String>,
}

/// A size written as a number of bytes or a string with a unit ("10MiB").
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

/// Everything `idem serve` runs with, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub upstream: Uri,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub store: String,
    pub ttl: Duration,
    pub lease: Duration,
    pub require_key: bool,
    pub methods: Vec<Method>,
    pub scope_sources: Vec<ScopeSource>,
    pub fingerprint_headers: Vec<HeaderName>,
    pub max_request_body: usize,
    pub max_stored_body: usize,
    pub max_buffered_bodies: usize,
    pub request_body_timeout: Duration,
    pub request_body_min_rate: usize,
    pub upstream_timeout: Duration,
    pub upstream_abandon_after: Duration,
    pub unknown_outcome: UnknownOutcome,
    pub max_wait: Duration,
    pub fail_open: bool,
    pub max_connections: usize,
    pub sweep_interval: Duration,
    pub shutdown_timeout: Duration,
    /// Per-route rules from the config file, the first match winning.
    pub routes: Vec<RouteRule>,
    pub admin_token: Option<String>,
    pub stuck_after: Duration,
    pub outbox_database: Option<String>,
    pub dead_letters_database: Option<String>,
    pub dead_letters_broker: Option<String>,
    pub dead_letters_exchange: String,
}

impl ServeArgs {
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let upstream = self.upstream.or(file.upstream).ok_or_else(|| {
            invalid("no upstream: pass --upstream URL (or IDEM_UPSTREAM, or upstream in --config)")
        })?;
        let upstream = parse_upstream(&upstream)?;
        let text = |cli: Option<String>, file: Option<String>, default: &str| {
            cli.or(file).unwrap_or_else(|| default.to_owned())
        };
        let duration = |name: &str, cli: Option<String>, file: Option<String>, default: &str| {
            parse_duration(name, &text(cli, file, default))
        };
        let size = |name: &str, cli: Option<String>, file: Option<Size>, default: u64| {
            let bytes = match (cli, file) {
                (Some(cli), _) => parse_size(name, &cli)?,
                (None, Some(Size::Bytes(bytes))) => bytes,
                (None, Some(Size::Text(text))) => parse_size(name, &text)?,
                (None, None) => default,
            };
            usize::try_from(bytes).map_err(|_| invalid(format!("--{name} is too large")))
        };
        let list = |cli: Option<String>, file: Option<Vec<String>>| -> Option<Vec<String>> {
            cli.map(|cli| {
                cli.split(',')
                    .map(|item| item.trim().to_owned())
                    .filter(|item| !item.is_empty())
                    .collect()
            })
            .or(file)
        };

        let methods = parse_methods(
            "methods",
            &list(self.methods, file.methods)
                .unwrap_or_else(|| vec!["POST".into(), "PATCH".into()]),
        )?;
        let scope_sources = parse_scope_sources(&text(
            self.scope_header,
            file.scope_header,
            "authorization,cookie",
        ))?;
        let fingerprint_headers = list(self.fingerprint_headers, file.fingerprint_headers)
            .unwrap_or_default()
            .iter()
            .map(|name| parse_header_name("fingerprint-headers", name))
            .collect::<Result<Vec<_>, _>>()?;

        let config = ServeConfig {
            upstream,
            listen: parse_addr("listen", &text(self.listen, file.listen, "127.0.0.1:8080"))?,
            admin_listen: parse_addr(
                "admin-listen",
                &text(self.admin_listen, file.admin_listen, "127.0.0.1:9080"),
            )?,
            store: text(self.store, file.store, "sqlite://idem.db"),
            ttl: duration("ttl", self.ttl, file.ttl, "24h")?,
            lease: duration("lease", self.lease, file.lease, "30s")?,
            require_key: self.require_key.or(file.require_key).unwrap_or(false),
            methods,
            scope_sources,
            fingerprint_headers,
            max_request_body: size(
                "max-request-body",
                self.max_request_body,
                file.max_request_body,
                10 << 20,
            )?,
            max_stored_body: size(
                "max-stored-body",
                self.max_stored_body,
                file.max_stored_body,
                1 << 20,
            )?,
            max_buffered_bodies: size(
                "max-buffered-bodies",
                self.max_buffered_bodies,
                file.max_buffered_bodies,
                1 << 30,
            )?,
            request_body_timeout: duration(
                "request-body-timeout",
                self.request_body_timeout,
                file.request_body_timeout,
                "10s",
            )?,
            request_body_min_rate: size(
                "request-body-min-rate",
                self.request_body_min_rate,
                file.request_body_min_rate,
                1 << 10,
            )?,
            upstream_timeout: duration(
                "upstream-timeout",
                self.upstream_timeout,
                file.upstream_timeout,
                "60s",
            )?,
            upstream_abandon_after: duration(
                "upstream-abandon-after",
                self.upstream_abandon_after,
                file.upstream_abandon_after,
                "10m",
            )?,
            unknown_outcome: parse_unknown_outcome(&text(
                self.unknown_outcome,
                file.unknown_outcome,
                "hold",
            ))?,
            max_wait: duration("max-wait", self.max_wait, file.max_wait, "30s")?,
            fail_open: self.fail_open.or(file.fail_open).unwrap_or(false),
            max_connections: self.max_connections.or(file.max_connections).unwrap_or(10_000),
            sweep_interval: duration(
                "sweep-interval",
                self.sweep_interval,
                file.sweep_interval,
                "60s",
            )?,
            shutdown_timeout: duration(
                "shutdown-timeout",
                self.shutdown_timeout,
                file.shutdown_timeout,
                "30s",
            )?,
            routes: file
                .route
                .into_iter()
                .enumerate()
                .map(|(index, route)| route.resolve(index + 1))
                .collect::<Result<_, _>>()?,
            admin_token: self.admin_token.or(file.admin_token),
            stuck_after: duration("stuck-after", self.stuck_after, file.stuck_after, "1m")?,
            outbox_database: self.outbox_database.or(file.outbox_database),
            dead_letters_database: self.dead_letters_database.or(file.dead_letters_database),
            dead_letters_broker: self.dead_letters_broker.or(file.dead_letters_broker),
            dead_letters_exchange: self
                .dead_letters_exchange
                .or(file.dead_letters_exchange)
                .unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }
}

impl ServeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.lease < Duration::from_secs(1) {
            return Err(invalid(
                "--lease must be at least 1s: a shorter lease would expire under ordinary load",
            ));
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(invalid("--ttl must be at least 1s"));
        }
        if self.max_connections == 0 {
            return Err(invalid("--max-connections must be at least 1"));
        }
        if self.sweep_interval.is_zero() {
            return Err(invalid("--sweep-interval must be longer than zero"));
        }
        if self.max_buffered_bodies < self.max_request_body {
            return Err(invalid(
                "--max-buffered-bodies must be at least --max-request-body, or no body that large could ever be taken",
            ));
        }
        if self.request_body_timeout < Duration::from_secs(1) {
            return Err(invalid("--request-body-timeout must be at least 1s"));
        }
        if self.request_body_min_rate == 0 {
            return Err(invalid("--request-body-min-rate must be at least 1 byte"));
        }
        if self.max_request_body == 0 || self.max_stored_body == 0 {
            return Err(invalid(
                "--max-request-body and --max-stored-body must be at least 1 byte",
            ));
        }
        if self.max_stored_body > u32::MAX as usize / 2 {
            return Err(invalid("--max-stored-body must be under 2 GiB"));
        }
        if self.upstream_timeout.is_zero() || self.upstream_abandon_after.is_zero() {
            return Err(invalid(
                "--upstream-timeout and --upstream-abandon-after must be longer than zero",
            ));
        }
        if self.upstream_abandon_after < self.upstream_timeout {
            return Err(invalid(
                "--upstream-abandon-after must be at least --upstream-timeout: a call is abandoned only after its client stopped waiting",
            ));
        }
        if self.methods.is_empty() {
            return Err(invalid("--methods must name at least one method"));
        }
        match &self.admin_token {
            Some(token)
                if token.len() < 16
                    || !token
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(c)) =>
            {
                return Err(invalid(
                    "--admin-token must be at least 16 characters of letters, digits and -._~+/= (e.g. from `openssl rand -hex 24`)",
                ));
            }
            None if !self.admin_listen.ip().is_loopback() => {
                return Err(invalid(format!(
                    "--admin-listen {} is reachable beyond this host: set --admin-token (or IDEM_ADMIN_TOKEN) so that only operators can see and release keys",
                    self.admin_listen
                )));
            }
            _ => {}
        }
        if self.dead_letters_database.as_deref().is_some_and(|url| url.starts_with("sqlite://")) {
            return Err(invalid(
                "--dead-letters-database must be PostgreSQL: consumers keep dead letters there only",
            ));
        }
        if self.dead_letters_broker.is_some() && self.dead_letters_database.is_none() {
            return Err(invalid(
                "--dead-letters-broker needs --dead-letters-database: the dead letters to put back live there",
            ));
        }
        for (index, rule) in self.routes.iter().enumerate() {
            let route = index + 1;
            if rule.ttl.is_some_and(|ttl| ttl < Duration::from_secs(1)) {
                return Err(invalid(format!("[[route]] {route}: ttl must be at least 1s")));
            }
            if rule.max_request_body == Some(0) || rule.max_stored_body == Some(0) {
                return Err(invalid(format!(
                    "[[route]] {route}: max-request-body and max-stored-body must be at least 1 byte"
                )));
            }
            if rule.max_request_body.is_some_and(|bytes| bytes > self.max_buffered_bodies) {
                return Err(invalid(format!(
                    "[[route]] {route}: max-request-body must be at most --max-buffered-bodies, or no body that large could ever be taken"
                )));
            }
            if rule.max_stored_body.is_some_and(|bytes| bytes > u32::MAX as usize / 2) {
                return Err(invalid(format!(
                    "[[route]] {route}: max-stored-body must be under 2 GiB"
                )));
            }
        }
        Ok(())
    }
}

impl FileRoute {
    /// The rule this block describes; errors name the block by its place in the file.
    fn resolve(self, route: usize) -> Result<RouteRule, ConfigError> {
        let named = |error: ConfigError| {
            invalid(format!("[[route]] {route}: {}", error.0.trim_start_matches("--")))
        };
        let matcher = match (&self.prefix, &self.path) {
            (Some(prefix), None) => RouteMatch::prefix(prefix),
            (None, Some(path)) => RouteMatch::pattern(path),
            _ => {
                return Err(invalid(format!(
                    "[[route]] {route}: give exactly one of prefix = \"/v1/payments\" or path = \"/v1/orders/*/refunds\""
                )));
            }
        }
        .map_err(|error| invalid(format!("[[route]] {route}: {error}")))?;
        let matcher = match &self.match_methods {
            Some(methods) if methods.is_empty() => {
                return Err(invalid(format!(
                    "[[route]] {route}: match-methods is empty, so the block would match nothing; leave it out to match every method"
                )));
            }
            Some(methods) => {
                matcher.methods(parse_methods("match-methods", methods).map_err(named)?)
            }
            None => matcher,
        };
        let mut rule = RouteRule::new(matcher);
        if let Some(require_key) = self.require_key {
            rule = rule.require_key(require_key);
        }
        if let Some(ttl) = &self.ttl {
            rule = rule.ttl(parse_duration("ttl", ttl).map_err(named)?);
        }
        if let Some(methods) = &self.methods {
            // Empty: nothing on this route gets idempotency handling.
            rule = rule.methods(parse_methods("methods", methods).map_err(named)?);
        }
        if let Some(headers) = &self.fingerprint_headers {
            let headers = headers
                .iter()
                .map(|name| parse_header_name("fingerprint-headers", name))
                .collect::<Result<Vec<_>, _>>()
                .map_err(named)?;
            rule = rule.fingerprint_headers(headers);
        }
        let size = |name: &str, size: Size| -> Result<usize, ConfigError> {
            let bytes = match size {
                Size::Bytes(bytes) => bytes,
                Size::Text(text) => parse_size(name, &text)?,
            };
            usize::try_from(bytes).map_err(|_| invalid(format!("--{name} is too large")))
        };
        if let Some(bytes) = self.max_request_body {
            rule = rule.max_request_body(size("max-request-body", bytes).map_err(named)?);
        }
        if let Some(bytes) = self.max_stored_body {
            rule = rule.max_stored_body(size("max-stored-body", bytes).map_err(named)?);
        }
        if let Some(policy) = &self.unknown_outcome {
            rule = rule.unknown_outcome(parse_unknown_outcome(policy).map_err(named)?);
        }
        Ok(rule)
    }
}

fn parse_methods(name: &str, names: &[String]) -> Result<Vec<Method>, ConfigError> {
    names
        .iter()
        .map(|method| {
            Method::from_bytes(method.trim().to_ascii_uppercase().as_bytes())
                .map_err(|_| invalid(format!("--{name}: {method:?} is not an HTTP method")))
        })
        .collect()
}

fn parse_unknown_outcome(text: &str) -> Result<UnknownOutcome, ConfigError> {
    match text {
        "hold" => Ok(UnknownOutcome::Hold),
        "release" => Ok(UnknownOutcome::Release),
        other => Err(invalid(format!("--unknown-outcome {other:?}: expected hold or release"))),
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| invalid(format!("cannot read config file {}: {error}", path.display())))?;
    toml::from_str(&text)
        .map_err(|error| invalid(format!("config file {}: {error}", path.display())))
}

fn parse_upstream(text: &str) -> Result<Uri, ConfigError> {
    let uri: Uri =
        text.parse().map_err(|error| invalid(format!("--upstream {text:?}: {error}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(invalid(format!(
                "--upstream {text:?}: scheme {other:?} is not supported; use http:// (put TLS in front of idem, not behind it)"
            )));
        }
        None => {
            return Err(invalid(format!(
                "--upstream {text:?}: needs http:// and a host, as in http://127.0.0.1:3000"
            )));
        }
    }
    if uri.authority().is_none() {
        return Err(invalid(format!(
            "--upstream {text:?}: needs a host, as in http://127.0.0.1:3000"
        )));
    }
    if uri.query().is_some() {
        return Err(invalid(format!("--upstream {text:?}: must not have a query")));
    }
    Ok(uri)
}

fn parse_addr(name: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(format!("--{name} {text:?}: expected an IP address and port, as in 127.0.0.1:8080"))
    })
}

/// `authorization,cookie:sid,cookie`: header names, or `cookie:NAME` for one cookie; the first
/// the request carries identifies the caller. `none`: every caller in one scope.
fn parse_scope_sources(text: &str) -> Result<Vec<ScopeSource>, ConfigError> {
    if matches!(text.trim(), "" | "none") {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once(':') {
            Some((prefix, cookie)) if prefix.eq_ignore_ascii_case("cookie") => {
                let valid = !cookie.is_empty()
                    && cookie
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
                if valid {
                    Ok(ScopeSource::Cookie(cookie.to_owned()))
                } else {
                    Err(invalid(format!("--scope-header: {cookie:?} is not a cookie name")))
                }
            }
            _ => parse_header_name("scope-header", item).map(ScopeSource::Header),
        })
        .collect()
}

fn parse_header_name(name: &str, text: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(text.trim().as_bytes())
        .map_err(|_| invalid(format!("--{name}: {text:?} is not a valid header name")))
}

pub fn parse_duration(name: &str, text: &str) -> Result<Duration, ConfigError> {
    if text.trim_start().starts_with('-') {
        return Err(invalid(format!("--{name} {text:?}: a duration cannot be negative")));
    }
    humantime::parse_duration(text)
        .map_err(|error| invalid(format!("--{name} {text:?}: {error} (write it as 30s, 5m, 24h)")))
}

/// Bytes, with an optional unit: B, KB/MB/GB (powers of 1000) or KiB/MiB/GiB (powers of 1024).
pub fn parse_size(name: &str, text: &str) -> Result<u64, ConfigError> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        invalid(format!("--{name} {text:?}: expected a size such as 1048576, 512KiB or 10MiB"))
    })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        other => {
            return Err(invalid(format!(
                "--{name} {text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            )));
        }
    };
    number.checked_mul(multiplier).ok_or_else(|| invalid(format!("--{name} {text:?}: too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(upstream: &str) -> ServeArgs {
        ServeArgs { upstream: Some(upstream.into()), ..ServeArgs::default() }
    }

    #[test]
    fn defaults_follow_the_cli_contract() {
        let config = args("http://127.0.0.1:3000").resolve().unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.admin_listen, "127.0.0.1:9080".parse().unwrap());
        assert_eq!(config.store, "sqlite://idem.db");
        assert_eq!(config.ttl, Duration::from_secs(24 * 3600));
        assert_eq!(config.lease, Duration::from_secs(30));
        assert_eq!(config.methods, vec![Method::POST, Method::PATCH]);
        assert_eq!(
            config.scope_sources,
            vec![
                ScopeSource::Header(http::header::AUTHORIZATION),
                ScopeSource::Header(http::header::COOKIE)
            ]
        );
        assert_eq!(
            parse_scope_sources("x-api-key, cookie:sid").unwrap(),
            vec![
                ScopeSource::Header(HeaderName::from_static("x-api-key")),
                ScopeSource::Cookie("sid".into())
            ]
        );
        assert_eq!(parse_scope_sources("none").unwrap(), vec![]);
        assert_eq!(config.max_request_body, 10 * 1024 * 1024);
        assert_eq!(config.max_stored_body, 1024 * 1024);
        assert!(!config.require_key && !config.fail_open);
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("idem-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("idem.toml");
        std::fs::write(
            &path,
            r#"
            upstream = "http://127.0.0.1:4000"
            ttl = "2h"
            lease = "10s"
            require-key = true
            methods = ["post", "put"]
            max-request-body = "1MiB"
            max-stored-body = 4096
            fingerprint-headers = ["content-type"]
            "#,
        )
        .unwrap();
        let config = ServeArgs {
            config: Some(path.clone()),
            lease: Some("5s".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(config.upstream, "http://127.0.0.1:4000");
        assert_eq!(config.ttl, Duration::from_secs(7200));
        assert_eq!(config.lease, Duration::from_secs(5), "the flag wins over the file");
        assert!(config.require_key);
        assert_eq!(config.methods, vec![Method::POST, Method::PUT]);
        assert_eq!(config.max_request_body, 1 << 20);
        assert_eq!(config.max_stored_body, 4096);
        assert_eq!(config.fingerprint_headers, vec![http::header::CONTENT_TYPE]);

        // A `true` in the file is turned off by a flag (or its variable) saying false.
        let off = ServeArgs {
            config: Some(path.clone()),
            require_key: Some(false),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert!(!off.require_key, "--require-key=false wins over the file's true");

        std::fs::write(&path, "upstream = \"http://x\"\nttll = \"1h\"\n").unwrap();
        let error = ServeArgs { config: Some(path), ..ServeArgs::default() }.resolve().unwrap_err();
        assert!(error.to_string().contains("ttll"), "{error}");
    }

    #[test]
    fn switches_take_an_optional_value_that_can_turn_them_off() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |extra: &[&str]| {
            let mut argv = vec!["idem", "--upstream", "http://127.0.0.1:3000"];
            argv.extend_from_slice(extra);
            let serve = Cli::try_parse_from(argv).unwrap().serve;
            (serve.require_key, serve.fail_open)
        };
        assert_eq!(parse(&[]), (None, None));
        assert_eq!(parse(&["--require-key", "--fail-open"]), (Some(true), Some(true)));
        assert_eq!(parse(&["--require-key=false", "--fail-open=no"]), (Some(false), Some(false)));
        assert_eq!(parse(&["--require-key=true"]), (Some(true), None));
        // A negative duration reaches the parser, which names the setting.
        let negative = Cli::try_parse_from(["idem", "--upstream", "http://a", "--lease", "-5s"]);
        let error = negative.unwrap().serve.resolve().unwrap_err().to_string();
        assert!(error.contains("--lease") && error.contains("negative"), "{error}");
        assert!(Cli::try_parse_from(["idem", "--require-key=maybe"]).is_err());
    }

    #[test]
    fn bad_values_get_readable_errors() {
        for (mut args, expected) in [
            (ServeArgs::default(), "no upstream"),
            (args("https://example.test"), "not supported"),
            (args("127.0.0.1:3000"), "needs http://"),
            (ServeArgs { ttl: Some("forever".into()), ..args("http://a") }, "--ttl \"forever\""),
            (ServeArgs { lease: Some("100ms".into()), ..args("http://a") }, "at least 1s"),
            (ServeArgs { lease: Some("-5s".into()), ..args("http://a") }, "cannot be negative"),
            (
                ServeArgs { max_request_body: Some("0".into()), ..args("http://a") },
                "--max-request-body and --max-stored-body must be at least 1 byte",
            ),
            (ServeArgs { listen: Some("localhost".into()), ..args("http://a") }, "--listen"),
            (
                ServeArgs { max_request_body: Some("10 parsecs".into()), ..args("http://a") },
                "unknown unit",
            ),
            (ServeArgs { methods: Some("PO ST".into()), ..args("http://a") }, "not an HTTP method"),
            (
                ServeArgs { scope_header: Some("bad header".into()), ..args("http://a") },
                "not a valid header",
            ),
        ] {
            args.config = None;
            let error = args.resolve().unwrap_err().to_string();
            assert!(error.contains(expected), "expected {expected:?} in {error:?}");
        }
        assert_eq!(parse_size("x", "10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("x", "2KB").unwrap(), 2000);
        assert_eq!(parse_size("x", "512").unwrap(), 512);
    }
}
