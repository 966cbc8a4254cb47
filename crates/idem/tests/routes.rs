//! Per-route rules from the config file: each setting a `[[route]]` block can change, shown on
//! the real gateway by what reaches the upstream, and the first matching block winning.

mod common;

use std::time::Duration;

use common::{BreakingUpstream, Gateway, Reply, Upstream, temp_dir, unique};

const RULES: &str = r#"
# Payments: a key is required, replays last 2 s (for the test), small bodies, and the
# account header is part of the fingerprint.
[[route]]
prefix = "/v1/payments"
require-key = true
ttl = "2s"
max-request-body = 64
fingerprint-headers = ["x-account"]

# Refunds need a key too, but only POSTs match this block.
[[route]]
path = "/v1/orders/*/refunds"
match-methods = ["POST"]
require-key = true

# Webhooks from a provider that sends no keys of ours: no idempotency handling at all.
[[route]]
prefix = "/webhooks"
methods = []

# The rest of /v1: PUT gets handling as well as POST (PATCH does not), and bodies over 16
# bytes are not stored.
[[route]]
prefix = "/v1"
methods = ["POST", "PUT"]
max-stored-body = 16
"#;

fn config_file(text: &str) -> String {
    let path = temp_dir().join("idem.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Whether two replies came from one run: the second a replay of the first.
fn replayed(first: &Reply, second: &Reply) -> bool {
    second.is_replay() && second.status == first.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_route_gets_its_own_settings_and_the_first_match_wins() {
    let upstream = Upstream::start().await;
    let config = config_file(RULES);
    let gateway = Gateway::start(&upstream.url(), "memory://", &["--config", &config]);
    let client = gateway.client();
    let key = |name: &str| unique(name);
    let calls = || upstream.calls();

    // require-key: only where a block asks for it.
    client.send("POST", "/v1/payments", &[], "{}").await.assert_problem(400, "missing-key");
    client
        .send("POST", "/v1/orders/42/refunds", &[], "{}")
        .await
        .assert_problem(400, "missing-key");
    assert_eq!(calls(), 0, "refused requests never reach the upstream");
    // The refunds block matches POST only; a PATCH falls to the /v1 block, which does not
    // handle PATCH at all: it passes through, key or no key.
    let before = calls();
    assert_eq!(client.send("PATCH", "/v1/orders/42/refunds", &[], "{}").await.status, 201);
    // One segment more is not the pattern: the /v1 block, which requires no key.
    assert_eq!(client.send("POST", "/v1/orders/42/refunds/7", &[], "{}").await.status, 201);
    // No block: the gateway's own settings (no key required).
    assert_eq!(client.send("POST", "/orders", &[], "{}").await.status, 201);
    assert_eq!(calls(), before + 3);

    // max-request-body: 64 bytes on payments, the default elsewhere.
    let big = "x".repeat(100);
    let payment = key("big-payment");
    client
        .send("POST", "/v1/payments", &[("idempotency-key", &payment)], big.clone())
        .await
        .assert_problem(413, "body-too-large");
    let other = key("big-other");
    let before = calls();
    assert_eq!(
        client.send("POST", "/v1/things", &[("idempotency-key", &other)], big).await.status,
        201
    );
    assert_eq!(calls(), before + 1, "only the request within its route's limit ran");

    // fingerprint-headers: x-account counts on payments, not on the rest of /v1.
    let payment = key("account");
    let first = client
        .send("POST", "/v1/payments", &[("idempotency-key", &payment), ("x-account", "a")], "{}")
        .await;
    assert_eq!(first.status, 201);
    client
        .send("POST", "/v1/payments", &[("idempotency-key", &payment), ("x-account", "b")], "{}")
        .await
        .assert_problem(422, "key-mismatch");
    let thing = key("account-thing");
    let first_thing = client
        .send("POST", "/v1/things", &[("idempotency-key", &thing), ("x-account", "a")], "{}")
        .await;
    let second_thing = client
        .send("POST", "/v1/things", &[("idempotency-key", &thing), ("x-account", "b")], "{}")
        .await;
    assert!(replayed(&first_thing, &second_thing), "x-account is not fingerprinted on /v1");

    // max-stored-body: the /v1 block's 16 bytes leave the replay without its body; payments
    // (first match, the default 1 MiB) keep it.
    let replay = second_thing.header("idempotent-replay").unwrap_or_default();
    assert!(replay.contains("body-omitted"), "{replay:?}");
    assert!(second_thing.body.is_empty() && !first_thing.body.is_empty());
    let kept = client
        .send("POST", "/v1/payments", &[("idempotency-key", &payment), ("x-account", "a")], "{}")
        .await;
    assert!(replayed(&first, &kept));
    assert_eq!(kept.body, first.body, "payments store the whole body");

    // methods: PUT gets handling under /v1 (replayed), PATCH passes through (runs twice);
    // under /v1/payments, which comes first, PUT passes through even though /v1 lists it.
    for (method, path, handled) in [
        ("PUT", "/v1/things/1", true),
        ("PATCH", "/v1/things/1", false),
        ("PUT", "/v1/payments/1", false),
        ("POST", "/webhooks/provider", false),
        ("POST", "/orders", true),
    ] {
        let key = key("methods");
        let before = calls();
        let first = client.send(method, path, &[("idempotency-key", &key)], "{}").await;
        let second = client.send(method, path, &[("idempotency-key", &key)], "{}").await;
        assert_eq!(first.status, 201, "{method} {path}");
        let runs = calls() - before;
        if handled {
            assert!(replayed(&first, &second), "{method} {path}: the retry replays");
            assert_eq!(runs, 1, "{method} {path} ran once");
        } else {
            assert!(!second.is_replay(), "{method} {path}: no idempotency handling");
            assert_eq!(runs, 2, "{method} {path} passes straight through");
        }
    }

    // ttl: payments' records expire after 2 s (a retry then runs as new); the rest keep the
    // default 24 h.
    let short = key("ttl-payment");
    let long = key("ttl-other");
    let send = |path: &'static str, key: String| {
        let client = client.clone();
        async move {
            let headers = [("idempotency-key", key.as_str()), ("x-account", "a")];
            client.send("POST", path, &headers, "{}").await
        }
    };
    send("/v1/payments", short.clone()).await;
    send("/orders", long.clone()).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let before = calls();
    let again = send("/v1/payments", short).await;
    let kept = send("/orders", long).await;
    assert!(!again.is_replay(), "the payments record expired after its route's 2 s TTL");
    assert!(kept.is_replay(), "the default TTL still holds");
    assert_eq!(calls(), before + 1);
}

/// The unknown-outcome policy per route: one route releases at lease expiry, the rest hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_unknown_outcome_policy_can_differ_by_route() {
    let upstream = BreakingUpstream::start().await;
    let config = config_file("[[route]]\nprefix = \"/reads\"\nunknown-outcome = \"release\"\n");
    let gateway =
        Gateway::start(&upstream.url(), "memory://", &["--config", &config, "--lease", "2s"]);
    let client = gateway.client();
    let send = |path: &'static str| {
        let client = client.clone();
        // A key per path: one key on two paths would be a mismatch.
        async move { client.send("POST", path, &[("idempotency-key", path)], "x").await }
    };
    send("/reads").await.assert_problem(502, "outcome-unknown");
    send("/orders").await.assert_problem(502, "outcome-unknown");
    assert_eq!(upstream.calls(), 2);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    // /reads: released when its lease expired, so the retry runs again; /orders: held, the
    // stored problem replayed.
    send("/reads").await.assert_problem(502, "outcome-unknown");
    let held = send("/orders").await;
    held.assert_problem(502, "outcome-unknown");
    assert!(held.is_replay(), "the held outcome replays");
    assert_eq!(upstream.calls(), 3, "only the released route ran again");
}

/// Mistakes in a `[[route]]` block stop the gateway with a message naming the block.
#[test]
fn a_bad_route_block_is_refused_with_its_place_and_reason() {
    for (block, expected) in [
        ("[[route]]\nrequire-key = true\n", "[[route]] 1: give exactly one of prefix"),
        ("[[route]]\nprefix = \"v1\"\n", "[[route]] 1: prefix \"v1\" must start with `/`"),
        (
            "[[route]]\nprefix = \"/a\"\n[[route]]\npath = \"/a/**/b\"\n",
            "[[route]] 2: path \"/a/**/b\"",
        ),
        ("[[route]]\nprefix = \"/a\"\nttl = \"soon\"\n", "[[route]] 1: ttl \"soon\""),
        ("[[route]]\nprefix = \"/a\"\nmethods = [\"P OST\"]\n", "is not an HTTP method"),
        ("[[route]]\nprefix = \"/a\"\nmatch-methods = []\n", "would match nothing"),
        ("[[route]]\nprefix = \"/a\"\nunknown-outcome = \"maybe\"\n", "expected hold or release"),
        ("[[route]]\nprefix = \"/a\"\nmax-request-body = \"2GiB\"\n", "--max-buffered-bodies"),
        ("[[route]]\nprefix = \"/a\"\nrequire_key = true\n", "unknown field"),
    ] {
        let config = config_file(block);
        let output = common::exits_within_20s(
            std::process::Command::new(common::idem_bin())
                .args(["serve", "--upstream", "http://127.0.0.1:1", "--store", "memory://"])
                .args(["--config", &config])
                .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]),
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{block:?} was accepted");
        assert!(stderr.contains(expected), "{block:?}: expected {expected:?} in {stderr}");
    }
}
