//! Traces exported over OTLP, configured by the standard `OTEL_*` variables.
//!
//! Nothing is exported, and no exporter is built, unless an endpoint is named
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or
//! `OTEL_TRACES_EXPORTER=otlp` asks for the default one (`http://localhost:4318`).
//! `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` turns export off whatever else is
//! set. The protocol is OTLP over HTTP with protobuf (`http/protobuf`, the default); the
//! exporter sends with the gateway's own HTTP/1 client, so the endpoint is `http://` (a
//! collector beside the gateway; there is no TLS stack in the build). Other settings are the
//! SDK's: `OTEL_SERVICE_NAME` (default `idem`), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_BSP_*` (the batch's delay and its bounded queue: spans past it are dropped, never
//! waited for).
//!
//! ```
//! use idem::telemetry::{OtlpSettings, requested};
//!
//! let env = |name: &str| (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://127.0.0.1:4318".to_owned());
//! assert_eq!(
//!     requested(env),
//!     Ok(Some(OtlpSettings { endpoint: Some("http://127.0.0.1:4318".into()), timeout: std::time::Duration::from_secs(10) }))
//! );
//! assert_eq!(requested(|_| None), Ok(None));
//! ```

use std::time::Duration;

/// What the environment asks of the trace exporter, when it asks for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The endpoint named, if any (the exporter reads the variables itself; this is for checks
    /// and messages).
    pub endpoint: Option<String>,
    /// How long one export may take (`OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`, in milliseconds; 10 s by default).
    pub timeout: Duration,
}

/// Whether the `OTEL_*` variables (read through `env`) ask for traces to be exported, and
/// how: `Ok(None)` when they do not, an error naming the setting when they ask for something
/// this build cannot do.
pub fn requested(env: impl Fn(&str) -> Option<String>) -> Result<Option<OtlpSettings>, String> {
    let var = |name: &str| env(name).map(|value| value.trim().to_owned()).filter(|v| !v.is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let exporter = var("OTEL_TRACES_EXPORTER");
    match exporter.as_deref() {
        None | Some("otlp") => {}
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER={other}: this build exports traces with otlp only (or none)"
            ));
        }
    }
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if endpoint.is_none() && exporter.is_none() {
        return Ok(None);
    }
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(protocol) = var(name)
            && protocol != "http/protobuf"
        {
            return Err(format!(
                "{name}={protocol}: this build sends traces with http/protobuf only (an OpenTelemetry Collector takes it on port 4318)"
            ));
        }
    }
    if let Some(endpoint) = &endpoint {
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|error| format!("the OTLP endpoint {endpoint:?} is not a URL: {error}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!(
                "the OTLP endpoint {endpoint:?}: only http://HOST:PORT is supported (no TLS in this build; send to a collector beside the gateway)"
            ));
        }
    }
    let timeout = ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .into_iter()
        .find_map(|name| var(name).map(|value| (name, value)))
        .map(|(name, value)| {
            value
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{name}={value}: a whole number of milliseconds"))
        })
        .transpose()?
        .unwrap_or(Duration::from_secs(10));
    if cfg!(not(feature = "otlp")) {
        return Err(
            "OTEL_* variables ask for traces, but this idem was built without its `otlp` feature"
                .into(),
        );
    }
    Ok(Some(OtlpSettings { endpoint, timeout }))
}

#[cfg(feature = "otlp")]
pub use exporter::{Telemetry, start};

/// Without the `otlp` feature there is never an exporter.
#[cfg(not(feature = "otlp"))]
#[derive(Debug)]
pub enum Telemetry {}

#[cfg(not(feature = "otlp"))]
impl Telemetry {
    pub fn layer<S>(&self) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
    where
        S: tracing::Subscriber
            + for<'span> tracing_subscriber::registry::LookupSpan<'span>
            + Send
            + Sync,
    {
        match *self {}
    }

    pub fn shutdown(self) {}
}

/// Without the `otlp` feature the variables are still checked, so that asking a build that
/// cannot send traces for them is an error, not silence.
#[cfg(not(feature = "otlp"))]
pub fn start(_runtime: &tokio::runtime::Handle) -> Result<Option<Telemetry>, String> {
    requested(|name| std::env::var(name).ok()).map(|_| None)
}

#[cfg(feature = "otlp")]
mod exporter {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, Limited};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_http::{HttpClient, HttpError};
    use opentelemetry_otlp::WithHttpConfig;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::Layer as _;

    /// The largest collector answer read (a partial-success message is a few bytes).
    const MAX_RESPONSE_BYTES: usize = 64 * 1024;
    /// How long shutdown waits for the last spans to be sent.
    const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

    /// The trace pipeline: spans batched (in the SDK's bounded queue) and sent from a thread
    /// of the SDK's own, through a client that does its I/O on the gateway's runtime.
    #[derive(Debug)]
    pub struct Telemetry {
        provider: SdkTracerProvider,
    }

    impl Telemetry {
        /// The layer that turns idem's spans (target `idem_trace`) into OpenTelemetry spans.
        /// Log events are not exported: their fields carry the raw Idempotency-Key, which a
        /// span only ever names by its hash.
        pub fn layer<S>(&self) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
        where
            S: tracing::Subscriber
                + for<'span> tracing_subscriber::registry::LookupSpan<'span>
                + Send
                + Sync,
        {
            let spans = tracing_subscriber::filter::Targets::new()
                .with_target(idem_trace::TARGET, tracing::Level::INFO);
            tracing_opentelemetry::layer()
                .with_tracer(self.provider.tracer("idem"))
                .with_filter(spans)
                .boxed()
        }

        /// Sends what is batched (waiting at most 5 s) and stops. Call while the runtime
        /// given to [`start`] still runs.
        pub fn shutdown(self) {
            if let Err(error) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
                tracing::warn!(%error, "could not send the last spans");
            }
        }
    }

    /// Builds the exporter the `OTEL_*` variables ask for, or nothing at all when they ask
    /// for none.
    pub fn start(runtime: &tokio::runtime::Handle) -> Result<Option<Telemetry>, String> {
        let Some(settings) = super::requested(|name| std::env::var(name).ok())? else {
            return Ok(None);
        };
        let client = OtlpClient::new(runtime.clone(), settings.timeout);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .build()
            .map_err(|error| format!("the OTLP trace exporter: {error}"))?;
        let mut resource = Resource::builder();
        let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                .is_ok_and(|attributes| attributes.contains("service.name="));
        if !named {
            resource = resource.with_service_name("idem");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        tracing::info!(
            endpoint = settings.endpoint.as_deref().unwrap_or("http://localhost:4318"),
            "exporting traces over OTLP"
        );
        Ok(Some(Telemetry { provider }))
    }

    /// The exporter's HTTP client: the gateway's own HTTP/1 client (no second HTTP stack in
    /// the build). The SDK exports from a thread of its own, outside any runtime, so each
    /// request is run on the gateway's runtime and awaited from there.
    #[derive(Debug)]
    struct OtlpClient {
        client: Client<HttpConnector, Full<Bytes>>,
        runtime: tokio::runtime::Handle,
        timeout: Duration,
        /// Whether the last export failed: a failing collector is logged once, not every
        /// batch, and its recovery once.
        failing: Arc<AtomicBool>,
    }

    impl OtlpClient {
        fn new(runtime: tokio::runtime::Handle, timeout: Duration) -> Self {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_connect_timeout(Some(timeout));
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(2)
                .build(connector);
            Self { client, runtime, timeout, failing: Arc::new(AtomicBool::new(false)) }
        }
    }

    #[async_trait::async_trait]
    impl HttpClient for OtlpClient {
        async fn send_bytes(
            &self,
            request: http::Request<Bytes>,
        ) -> Result<http::Response<Bytes>, HttpError> {
            let client = self.client.clone();
            let timeout = self.timeout;
            let endpoint = request.uri().clone();
            let sent = self.runtime.spawn(async move {
                let exchange = async {
                    let response = client.request(request.map(Full::new)).await?;
                    let (parts, body) = response.into_parts();
                    let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await?.to_bytes();
                    Ok::<_, HttpError>(http::Response::from_parts(parts, body))
                };
                match tokio::time::timeout(timeout, exchange).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {timeout:?}").into()),
                }
            });
            let result = match sent.await {
                Ok(result) => result,
                Err(error) => Err(format!("the export task stopped: {error}").into()),
            };
            let failed = match &result {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => Some(format!("the collector answered {}", response.status())),
                Err(error) => Some(error.to_string()),
            };
            match failed {
                Some(error) if !self.failing.swap(true, Ordering::Relaxed) => tracing::warn!(
                    %endpoint, %error,
                    "cannot send traces to the OTLP endpoint; spans are dropped until it answers"
                ),
                None if self.failing.swap(false, Ordering::Relaxed) => {
                    tracing::info!(%endpoint, "sending traces to the OTLP endpoint again")
                }
                _ => {}
            }
            result
        }
    }
}
