//! Hostile and careless clients against the real binary: slow senders are cut off and cannot
//! hold the connection limit, and every such refusal is counted.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, Upstream, sqlite_store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client that declares a 5 MiB body and trickles it in, 1 KiB every 2 s; returns the
/// status line it got (if any) and how long its connection lasted.
async fn slow_sender(addr: std::net::SocketAddr, key: String) -> (Option<String>, Duration) {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\ncontent-length: {}\r\n\r\n",
        5 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let feeding = tokio::spawn(async move {
        let chunk = vec![b'x'; 1024];
        for _ in 0..60 {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut answer)).await;
    feeding.abort();
    let status = String::from_utf8_lossy(&answer).lines().next().map(str::to_owned);
    assert!(read.is_ok(), "a slow sender was never cut off");
    (status.filter(|line| !line.is_empty()), started.elapsed())
}

/// The numbers scaled down: `--max-connections 20` and 20 slow senders. Before, they
/// held every connection for as long as they fed it; now a quarter may take their time (and
/// are cut when they fall under the minimum rate), the rest are cut after a second, and
/// ordinary requests keep being served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_senders_are_cut_off_and_cannot_hold_the_connection_limit() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &sqlite_store(),
        &[
            "--max-connections",
            "20",
            "--request-body-timeout",
            "2s",
            "--request-body-min-rate",
            "1KiB",
        ],
    );
    let senders: Vec<_> =
        (0..20).map(|i| tokio::spawn(slow_sender(gateway.addr, format!("slow-{i}")))).collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // Ordinary requests, one every 300 ms while the slow senders are at it.
    let client = gateway.client();
    let mut served = 0;
    for i in 0..10 {
        let reply = client.post(&format!("normal-{i}"), "{\"qty\":1}", &[]).await;
        if reply.status == 201 {
            served += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let mut timed_out = 0;
    let mut longest = Duration::ZERO;
    for sender in senders {
        let (status, lasted) = sender.await.unwrap();
        longest = longest.max(lasted);
        if status.as_deref().is_some_and(|line| line.starts_with("HTTP/1.1 408")) {
            timed_out += 1;
        }
    }
    eprintln!(
        "20 slow senders: {timed_out} answered 408, the longest held its connection {longest:?}; {served} of 10 ordinary requests served meanwhile"
    );
    assert_eq!(served, 10, "ordinary requests were locked out");
    assert_eq!(timed_out, 20, "every slow sender is told why");
    assert!(longest < Duration::from_secs(10), "a slow sender held on for {longest:?}");
    assert_eq!(upstream.calls(), 10, "no trickled body ran");
}

/// A client that writes its whole oversized body before reading (as Python's urllib does)
/// gets the 413, not a connection reset: the gateway reads and discards the rest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_its_whole_oversized_body_first_gets_the_413() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &["--max-request-body", "4MiB"]);
    for declared in [true, false] {
        let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        // Larger than the socket buffers between client and gateway can hold.
        let size = 7 << 20;
        let mut request = if declared {
            format!("POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: big\r\nconnection: close\r\ncontent-length: {size}\r\n\r\n")
                .into_bytes()
        } else {
            b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: big\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n".to_vec()
        };
        if declared {
            request.extend(std::iter::repeat_n(b'x', size));
        } else {
            for _ in 0..(size / 65_536) {
                request.extend_from_slice(b"10000\r\n");
                request.extend(std::iter::repeat_n(b'x', 65_536));
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"0\r\n\r\n");
        }
        stream.write_all(&request).await.expect("the whole body is taken in");
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "declared {declared}: {answer:?}");
        assert!(answer.contains("application/problem+json"), "{answer}");
    }
    assert_eq!(upstream.calls(), 0);
}

/// Makes `path` immutable (`chattr +i`, which even root cannot write through) or writable
/// again; `false` if this machine cannot (not root, not a file system with the attribute).
fn immutable(path: &std::path::Path, on: bool) -> bool {
    std::process::Command::new("chattr")
        .arg(if on { "+i" } else { "-i" })
        .arg(path)
        .status()
        .is_ok_and(|status| status.success())
}

/// The database and its write-ahead log (where SQLite's writes land first) made immutable,
/// or writable again.
fn database_immutable(db: &std::path::Path, on: bool) -> bool {
    let wal = db.with_extension("db-wal");
    immutable(db, on) && (!wal.exists() || immutable(&wal, on))
}

/// A store that answers but cannot take a write: `/healthz` says so with the reason, and a
/// gateway refuses to start on it, instead of answering ready and failing every keyed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_take_a_write_is_unhealthy_and_refused_at_start() {
    let upstream = Upstream::start().await;
    let dir = common::temp_dir();
    let db = dir.join("idem.db");
    let store = format!("sqlite://{}", db.display());
    let gateway = Gateway::start(&upstream.url(), &store, &[]);
    let admin = common::TestClient::new(gateway.admin);
    assert_eq!(admin.get_text("/healthz").await.0, 200);
    assert_eq!(gateway.client().post("before", "x", &[]).await.status, 201);
    if !database_immutable(&db, true) {
        idem_core::conformance::skip("chattr +i is not possible here (needs root on ext4)");
        return;
    }
    let (status, reason) = admin.get_text("/healthz").await;
    let refused = gateway.client().post("during", "x", &[]).await;
    assert!(gateway.client().post("before", "x", &[]).await.is_replay(), "reads still replay");
    drop(gateway);
    let second_start = std::process::Command::new(common::idem_bin())
        .args(["serve", "--upstream", &upstream.url(), "--store", &store])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(database_immutable(&db, false));
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("cannot take a write"), "{reason}");
    refused.assert_problem(503, "store-unavailable");
    assert!(!second_start.status.success());
    let stderr = String::from_utf8_lossy(&second_start.stderr);
    assert!(stderr.contains("cannot take a write"), "{stderr}");
    assert_eq!(upstream.calls(), 1, "nothing ran while the store could not record it");
}

/// Resident and peak resident memory of a process, in MiB (from `/proc`).
fn memory_mib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The case: 40 connections each holding 9 MiB of an unfinished body, written in
/// 1 KiB pieces. Buffered in one allocation per body (not per piece), they cost about their
/// size, and the memory goes back when the connections close, burst after burst (the gateway
/// fixes glibc's mmap threshold; see `main.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_sent_in_small_pieces_cost_about_their_size() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let (baseline, _) = memory_mib(gateway.pid());
    // Two bursts: memory must come back after the second as after the first (an allocator
    // that keeps what it once used would show it only then).
    for burst in 0..2 {
        let (holding, after) = burst_of_unfinished_bodies(&gateway, burst).await;
        let (_, peak) = memory_mib(gateway.pid());
        eprintln!(
            "burst {burst}: 40 x 9 MiB bodies in 1 KiB writes (360 MiB): RSS {baseline} MiB before, {holding} MiB holding them (peak so far {peak}), {after} MiB after the connections closed"
        );
        assert!(peak < baseline + 2 * 360, "peak RSS {peak} MiB for 360 MiB of bodies");
        assert!(after < baseline + 120, "RSS stayed at {after} MiB after the connections closed");
    }
    assert_eq!(upstream.calls(), 0);
}

/// 40 connections each send all but the last byte of a 9 MiB body in 1 KiB writes, hold it,
/// then close: RSS (MiB) while they hold it and after they closed.
async fn burst_of_unfinished_bodies(gateway: &Gateway, burst: usize) -> (u64, u64) {
    let size = 9 << 20;
    let piece = vec![b'x'; 1024];
    let writers: Vec<_> = (0..40)
        .map(|i| {
            let piece = piece.clone();
            let addr = gateway.addr;
            tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let head = format!(
                    "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: mem-{burst}-{i}\r\ncontent-length: {size}\r\n\r\n"
                );
                stream.write_all(head.as_bytes()).await.unwrap();
                for _ in 0..(size / 1024 - 1) {
                    stream.write_all(&piece).await.unwrap();
                }
                stream.write_all(&piece[..1023]).await.unwrap();
                stream
            })
        })
        .collect();
    let mut streams = Vec::new();
    for writer in writers {
        streams.push(writer.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (holding, _) = memory_mib(gateway.pid());
    drop(streams);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = memory_mib(gateway.pid());
    (holding, after)
}

/// All request bodies together have a memory budget: a body that would pass it waits a second
/// for room, then gets `503 overloaded` with `Retry-After`, and nothing runs; room comes back
/// when the bodies holding it are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_share_one_memory_budget() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(
        &upstream.url(),
        &sqlite_store(),
        &["--max-buffered-bodies", "8MiB", "--max-request-body", "6MiB"],
    );
    // A 6 MiB body, all but its last byte: it holds 6 MiB of the budget.
    let size = 6 << 20;
    let mut holder = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: holder\r\nconnection: close\r\ncontent-length: {size}\r\n\r\n"
    );
    holder.write_all(head.as_bytes()).await.unwrap();
    holder.write_all(&vec![b'x'; size - 1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let client = gateway.client();
    let four_mib = "y".repeat(4 << 20);
    let refused = client.post("too-much", &four_mib, &[]).await;
    refused.assert_problem(503, "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    let small = client.post("small", "{}", &[]).await;
    assert_eq!(small.status, 201, "a body that fits the rest of the budget is taken");

    holder.write_all(b"x").await.unwrap();
    let mut answer = Vec::new();
    holder.read_to_end(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 201"));
    let later = client.post("too-much", &four_mib, &[]).await;
    assert_eq!(later.status, 201, "the budget came back");
    assert_eq!(upstream.calls(), 3);

    // A body that declares 6 MiB and sends nothing holds none of the budget.
    let mut silent = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: silent\r\ncontent-length: {size}\r\n\r\n"
    );
    silent.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.post("beside-silent", &four_mib, &[]).await.status, 201);

    // A chunked body close to the whole budget is taken (its reservation never passes the
    // limit).
    let tight = Gateway::start(
        &upstream.url(),
        &sqlite_store(),
        &["--max-buffered-bodies", "6MiB", "--max-request-body", "6MiB"],
    );
    let mut stream = tokio::net::TcpStream::connect(tight.addr).await.unwrap();
    let mut request = b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: chunked\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..80 {
        request.extend_from_slice(b"10000\r\n");
        request.extend(std::iter::repeat_n(b'z', 65_536));
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "a 5 MiB chunked body: {answer:?}");
    assert_eq!(upstream.calls(), 5);
}

/// The memory store is bounded in bytes: when full, new keys get 503 and run nowhere, while
/// stored responses still replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_refuses_new_keys_and_still_replays() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), "memory://?max_bytes=1MiB", &[]);
    let client = gateway.client();
    let big = [("x-test-body-bytes", "300000")];
    let mut stored = Vec::new();
    let refused = loop {
        let key = format!("fill-{}", stored.len());
        let reply = client.post(&key, "x", &big).await;
        if reply.status != 201 {
            break reply;
        }
        stored.push(key);
        assert!(stored.len() < 10, "the bound was never reached");
    };
    refused.assert_problem(503, "overloaded");
    assert_eq!(stored.len(), 4, "1 MiB holds four responses of 300 kB");
    for key in &stored {
        assert!(client.post(key, "x", &big).await.is_replay(), "{key} still replays");
    }
    assert_eq!(upstream.calls(), 4, "the refused key ran nowhere");

    // Even failing open, a full store is not a reason to forward without idempotency.
    let open = Gateway::start(&upstream.url(), "memory://?max_bytes=1MiB", &["--fail-open"]);
    let client = open.client();
    for i in 0..6 {
        let reply = client.post(&format!("open-{i}"), "x", &big).await;
        if i >= 4 {
            reply.assert_problem(503, "overloaded");
        }
    }
    assert_eq!(upstream.calls(), 8);
}

/// Sends one request whose header block is `fields` extra `x-filler-N` fields of `value`, and
/// returns the raw answer.
async fn with_filler_headers(addr: std::net::SocketAddr, fields: usize, value: &str) -> String {
    let mut request =
        String::from("POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: heads\r\n");
    for i in 0..fields {
        request.push_str(&format!("x-filler-{i}: {value}\r\n"));
    }
    request.push_str("content-length: 1\r\nconnection: close\r\n\r\nx");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// A header block over the limits (100 fields, 64 KiB) is refused with a `431` problem that
/// says which limit, and runs nothing; only a block past the HTTP parser's own room (400
/// fields) gets the parser's bare `431`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_or_too_large_headers_get_a_431_problem() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream.url(), &sqlite_store(), &[]);
    let within = with_filler_headers(gateway.addr, 90, "v").await;
    assert!(within.starts_with("HTTP/1.1 201"), "{within}");

    let many = with_filler_headers(gateway.addr, 150, "v").await;
    assert!(many.starts_with("HTTP/1.1 431"), "{many}");
    assert!(many.contains("application/problem+json"), "{many}");
    assert!(many.contains("urn:idem:problem:headers-too-large"), "{many}");
    assert!(many.contains("at most 100 are taken"), "{many}");

    let large = with_filler_headers(gateway.addr, 10, &"c".repeat(8_000)).await;
    assert!(large.starts_with("HTTP/1.1 431"), "{large}");
    assert!(large.contains("bytes of header fields; at most 65536"), "{large}");

    let beyond = with_filler_headers(gateway.addr, 500, "v").await;
    assert!(beyond.starts_with("HTTP/1.1 431"), "{beyond}");
    assert_eq!(upstream.calls(), 1, "only the request within the limits ran");
    let admin = common::TestClient::new(gateway.admin);
    let metrics = common::metrics(&admin.get_text("/metrics").await.1);
    assert_eq!(metrics.get("idem_rejected_total{reason=\"headers-too-large\"}"), Some(&2.0));
}

/// The SQLite store's disk full (a small tmpfs of the test's own, filled by another file):
/// `/healthz` says so, a new key is refused without running, stored responses still replay,
/// and room made again heals it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_sqlite_is_unhealthy_and_runs_nothing() {
    let dir = common::temp_dir();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&dir)
        .status()
        .is_ok_and(|status| status.success());
    if !mounted {
        idem_core::conformance::skip("cannot mount a small tmpfs here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    let upstream = Upstream::start().await;
    let store = format!("sqlite://{}", dir.join("idem.db").display());
    let gateway = Gateway::start(&upstream.url(), &store, &[]);
    let admin = common::TestClient::new(gateway.admin);
    assert_eq!(gateway.client().post("before", "x", &[]).await.status, 201);

    let filler = dir.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    drop(file);

    let (status, reason) = admin.get_text("/healthz").await;
    let refused = gateway.client().post("during", "x", &[("x-test-body-bytes", "200000")]).await;
    let replay = gateway.client().post("before", "x", &[]).await;
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("full"), "{reason}");
    refused.assert_problem(503, "store-unavailable");
    assert!(replay.is_replay(), "stored responses still replay");
    wait_healthy_admin(&admin).await;
    assert_eq!(gateway.client().post("during", "x", &[]).await.status, 201);
    assert_eq!(upstream.calls(), 2, "nothing ran while the disk was full");
}

async fn wait_healthy_admin(admin: &common::TestClient) {
    for _ in 0..100 {
        if admin.get_text("/healthz").await.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never healthy again: {}", admin.get_text("/healthz").await.1);
}
