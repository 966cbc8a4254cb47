//! The PostgreSQL floor: what a hand-written per-request approach reaches on the same server.
//! `pgbench` runs the two statements a fresh key needs (insert the claim, then store the
//! outcome), each committed on its own as a request does, with as many clients as the HTTP
//! rows have connections, and no HTTP, gateway or upstream in the way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SCRIPT: &str = "\\set n random(1, 9000000000000000)
INSERT INTO idem_bench_floor (scope, key, fingerprint, state, token, lease_expires_at, payload, created_at, expires_at) VALUES ('floor', 'k' || :client_id || '-' || :n, '\\x0102', 0, :n, 1, NULL, 1, 2) ON CONFLICT DO NOTHING;
UPDATE idem_bench_floor SET state = 1, payload = '\\x7b226f6b223a747275657d', token = NULL, lease_expires_at = NULL, expires_at = 3 WHERE scope = 'floor' AND key = 'k' || :client_id || '-' || :n AND state = 0 AND token = :n;
";

/// `pgbench`, if installed: on PATH or beside the server's other programs.
pub fn find() -> Option<PathBuf> {
    let on_path =
        Command::new("pgbench").arg("--version").output().is_ok_and(|o| o.status.success());
    if on_path {
        return Some(PathBuf::from("pgbench"));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin/pgbench")))
        .filter(|path| path.exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// Makes the table the script writes: idem's own record shape, in a table of its own.
pub async fn prepare(url: &str) -> Result<(), String> {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    client
        .batch_execute(
            "DROP TABLE IF EXISTS idem_bench_floor;
             CREATE TABLE idem_bench_floor (
                 scope text NOT NULL, key text NOT NULL, fingerprint bytea NOT NULL,
                 state smallint NOT NULL, token bigint, lease_expires_at bigint, payload bytea,
                 created_at bigint NOT NULL, expires_at bigint NOT NULL,
                 watched boolean NOT NULL DEFAULT false,
                 PRIMARY KEY (scope, key));
             CREATE INDEX ON idem_bench_floor (expires_at);",
        )
        .await
        .map_err(|e| e.to_string())
}

/// Drops the schemas earlier runs left, so that every PostgreSQL row starts on an empty table,
/// as the floor's does.
pub async fn drop_schemas(url: &str, schemas: &[&str]) -> Result<(), String> {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    for schema in schemas {
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
            .map_err(|e| format!("dropping {schema}: {e}"))?;
    }
    Ok(())
}

pub async fn drop_table(url: &str) {
    if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        tokio::spawn(connection);
        let _ = client.batch_execute("DROP TABLE IF EXISTS idem_bench_floor").await;
    }
}

/// One run of `duration` with `clients` clients: requests (script runs) per second.
pub async fn run(
    pgbench: &Path,
    url: &str,
    scratch: &Path,
    clients: usize,
    duration: Duration,
) -> Result<f64, String> {
    let script = scratch.join("floor.sql");
    std::fs::write(&script, SCRIPT).map_err(|e| e.to_string())?;
    let output = tokio::process::Command::new(pgbench)
        .args(["--no-vacuum", "--protocol=prepared", "--jobs=2"])
        .arg(format!("--client={clients}"))
        .arg(format!("--time={}", duration.as_secs().max(1)))
        .arg("--file")
        .arg(&script)
        .arg(url)
        .output()
        .await
        .map_err(|e| format!("pgbench: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("pgbench failed: {}", String::from_utf8_lossy(&output.stderr)));
    }
    // "tps = 7312.345678 (without initial connection time)"
    text.lines()
        .find_map(|line| line.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .ok_or_else(|| format!("no tps in pgbench's output: {text}"))
}
