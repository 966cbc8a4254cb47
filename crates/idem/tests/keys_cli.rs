//! `idem keys` against every store: the operator's story of finding a stuck key and
//! unsticking it by hand, plus listing and showing what is stored.

mod common;

use std::time::Duration;

use common::{Gateway, Upstream, temp_dir, unique};
use idem_core::conformance::service_url;

fn keys(store: &str, args: &[&str]) -> (i32, String, String) {
    common::idem_keys(store, args)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

async fn operator_unsticks_a_key(store: &str) {
    let upstream = Upstream::start().await;
    // A caller of its own, so listing by scope sees only this test's records.
    let credential = format!("Bearer {}", unique("operator"));
    let auth = [("authorization", credential.as_str())];
    let mut gateway = Gateway::start(&upstream.url(), store, &["--lease", "60s"]);
    let client = gateway.client();
    assert_eq!(client.post("done", "x", &auth).await.status, 201);
    // A request whose gateway dies mid-flight leaves its key in flight for the 60 s lease.
    let stuck_request = {
        let client = client.clone();
        let auth = credential.clone();
        tokio::spawn(async move {
            client
                .post("stuck", "x", &[("authorization", &auth), ("x-test-delay-ms", "5000")])
                .await
        })
    };
    while upstream.calls() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.kill9();
    stuck_request.abort();

    let (code, out, err) = keys(store, &["list", "--credential", &credential, "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed = json(&out);
    let states: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["key"].as_str().unwrap(), row["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("done", "completed"), ("stuck", "in-flight")], "oldest first");
    let (_, out, _) = keys(store, &["list", "--credential", &credential, "--state", "in-flight"]);
    assert!(out.contains("stuck") && !out.contains("done"), "{out}");
    assert!(out.contains("LEASE LEFT"), "a table for people: {out}");

    let (code, out, _) = keys(store, &["show", "--credential", &credential, "done", "--json"]);
    assert_eq!(code, 0);
    let shown = json(&out);
    assert_eq!(shown["response"]["status"], 201);
    assert!(shown["response"]["body"].as_str().unwrap().contains("\"call\":1"));

    // While stuck, a retry is refused...
    let restarted = Gateway::start(&upstream.url(), store, &["--lease", "60s"]);
    let client = restarted.client();
    client.post("stuck", "x", &auth).await.assert_problem(409, "request-in-flight");
    // ...until the operator deletes the record: then it runs at once.
    let (code, out, _) = keys(store, &["delete", "--credential", &credential, "stuck"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deleted"), "{out}");
    assert_eq!(client.post("stuck", "x", &auth).await.status, 201);
    assert_eq!(upstream.calls(), 3);
    assert!(client.post("done", "x", &auth).await.is_replay(), "other records are untouched");

    let (code, out, _) = keys(store, &["delete", "--credential", &credential, "never-used"]);
    assert_eq!(code, 1, "deleting nothing says so: {out}");
    let (code, _, err) = keys(store, &["show", "done"]);
    assert_eq!(code, 2);
    assert!(err.contains("--scope, --credential or --anonymous"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_unsticks_a_key_in_sqlite() {
    let store = format!("sqlite://{}", temp_dir().join("idem.db").display());
    operator_unsticks_a_key(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_unsticks_a_key_in_postgres() {
    let Some(url) = service_url("IDEM_TEST_POSTGRES_URL") else { return };
    let separator = if url.contains('?') { '&' } else { '?' };
    operator_unsticks_a_key(&format!("{url}{separator}schema=idem_keys_tests")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_unsticks_a_key_in_redis() {
    let Some(url) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let separator = if url.contains('?') { '&' } else { '?' };
    operator_unsticks_a_key(&format!("{url}{separator}prefix=idem_keys_tests")).await;
}

#[test]
fn bad_store_urls_get_readable_errors() {
    for (store, expected) in [
        (
            "mysql://x",
            "expected memory://, sqlite://PATH, postgres://..., redis://..., rediss://... (TLS) or redis+cluster://...",
        ),
        ("postgres://idem:hunter2@127.0.0.1:1/db?op_timeout_ms=300", "postgres://idem:***@"),
        ("sqlite://x.db?mode=fast", "unknown sqlite:// URL parameter"),
    ] {
        let (code, _, err) = keys(store, &["list"]);
        assert_eq!(code, 2, "{store}");
        assert!(err.contains(expected), "{store}: {err}");
        assert!(!err.contains("hunter2"), "passwords never reach the terminal: {err}");
    }
}

/// No secret reaches the terminal, in any form an address carries one: from `idem keys`,
/// `idem serve` and `idem relay` failing to reach what they were given.
#[test]
fn no_secret_is_printed_in_any_form() {
    let secrets = ["s3cretpw", "hunter22", "t0kenxyz", "sp4ce pw"];
    let stores = [
        "postgres://postgres:s3cretpw@127.0.0.1:1/postgres?password=hunter22&op_timeout_ms=300",
        "redis://:s3cretpw@127.0.0.1:1/?op_timeout_ms=300",
        "redis://127.0.0.1:1/?password=hunter22&op_timeout_ms=300",
        "host=127.0.0.1 port=1 user=idem password='sp4ce pw' dbname=x",
    ];
    let check = |what: &str, output: std::process::Output| {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!output.status.success(), "{what}: {text}");
        for secret in secrets {
            assert!(!text.contains(secret), "{what} printed {secret:?}: {text}");
        }
        assert!(text.contains("***") || text.contains("expected memory://"), "{what}: {text}");
    };
    let idem = common::idem_bin();
    for store in stores {
        let keys = std::process::Command::new(&idem)
            .args(["keys", "--store", store, "list"])
            .output()
            .unwrap();
        check(&format!("idem keys --store {store}"), keys);
        let serve = std::process::Command::new(&idem)
            .args(["serve", "--upstream", "http://127.0.0.1:1", "--store", store])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        check(&format!("idem serve --store {store}"), serve);
    }
    let relay = std::process::Command::new(&idem)
        .args(["relay", "--database", "postgres://idem:s3cretpw@127.0.0.1:1/x?connect_timeout=1"])
        .args(["--broker", "nats://t0kenxyz@127.0.0.1:1"])
        .output()
        .unwrap();
    check("idem relay", relay);
}

/// `idem keys` works on what a gateway set up: it never creates a SQLite file or a schema.
#[test]
fn keys_never_creates_or_migrates_a_store() {
    let missing = temp_dir().join("never-created.db");
    let store = format!("sqlite://{}", missing.display());
    let (code, _, err) = keys(&store, &["list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot open SQLite database"), "{err}");
    assert!(!missing.exists(), "idem keys created {}", missing.display());

    // A SQLite file that is not idem's is refused and left as it was.
    let foreign = temp_dir().join("foreign.db");
    std::fs::write(&foreign, b"").unwrap();
    let (code, _, err) = keys(&format!("sqlite://{}", foreign.display()), &["list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no idem schema"), "{err}");
    assert_eq!(std::fs::metadata(&foreign).unwrap().len(), 0, "the file was written to");
}

/// A database error carries the server's own words (tokio-postgres alone says "db error").
#[test]
fn database_errors_carry_the_servers_message() {
    let Some(url) = service_url("IDEM_TEST_POSTGRES_URL") else { return };
    let base = url.split('?').next().unwrap();
    let (root, _) = base.rsplit_once('/').unwrap();
    let missing = format!("{root}/idem_no_such_database");
    let (code, _, err) = keys(&missing, &["list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("database \"idem_no_such_database\" does not exist"), "{err}");
}
