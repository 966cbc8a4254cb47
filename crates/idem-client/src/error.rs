//! The one outcome the middleware turns into an error: `502 outcome-unknown`.

/// The gateway answered `502` with the problem type `urn:idem:problem:outcome-unknown`: the
/// request under this key reached the service, and the connection broke before a whole
/// response, so nobody knows whether it took effect. The gateway holds the key with that
/// answer until an operator releases it (`idem keys release`) or its TTL passes, so retrying
/// the key only gets the same `502` back, and retrying under a *new* key could do the work
/// twice. The middleware therefore stops at once (no retries spent) and hands this error up.
///
/// What to do: find out whether the work happened (look the order or payment up), then have
/// an operator release the key and retry with the same key, or record it as done. Read it off
/// a [`reqwest_middleware::Error`] with [`outcome_unknown`](crate::outcome_unknown).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the outcome of the request with Idempotency-Key {key:?} is unknown (502 outcome-unknown after {attempts} attempt(s)): it may have run; the gateway holds the key until an operator releases it; do not retry under a new key: {detail}"
)]
#[non_exhaustive]
pub struct OutcomeUnknown {
    /// The `Idempotency-Key` the request was sent with.
    pub key: String,
    /// How many times this call was sent.
    pub attempts: u32,
    /// Whether the gateway replayed a stored answer (`Idempotent-Replayed: true`): the key was
    /// already held from an earlier call.
    pub replayed: bool,
    /// The problem's `detail`, as the gateway wrote it.
    pub detail: String,
}

/// The [`OutcomeUnknown`] inside an error the middleware returned, if that is what it is.
///
/// ```
/// # async fn call(client: reqwest_middleware::ClientWithMiddleware) {
/// match client.post("http://127.0.0.1:8080/payments").body("{}").send().await {
///     Ok(response) => { /* the one answer */ }
///     Err(error) => match idem_client::outcome_unknown(&error) {
///         Some(unknown) => eprintln!("check payment {} by hand: {unknown}", unknown.key),
///         None => eprintln!("failed: {error}"),
///     },
/// }
/// # }
/// ```
pub fn outcome_unknown(error: &reqwest_middleware::Error) -> Option<&OutcomeUnknown> {
    match error {
        reqwest_middleware::Error::Middleware(error) => error.downcast_ref::<OutcomeUnknown>(),
        _ => None,
    }
}
