//! Three gateways on one Redis behind nginx, configured with `deploy/nginx/idem.conf` as it
//! is (only its ports changed). Clients talk to nginx only; they give up on an answer after
//! 150 ms and send the request again with its key, so retries land on other gateways while the
//! first run goes on. Meanwhile each gateway in turn is stopped with SIGTERM and started again
//! on its port (a rolling restart). Every operation gets its outcome, none runs twice, and each
//! completed one replays through nginx. The counts are printed; docs/deploying.md quotes them.

mod common;

use common::free_port;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Gateway, TestClient, Upstream, calls_per_key, temp_dir, unique};
use idem_core::conformance::{service_url, skip};

/// The worked example, as users copy it.
const EXAMPLE: &str = include_str!("../../../deploy/nginx/idem.conf");
const CLIENTS: usize = 24;
/// How long a client waits for an answer before it sends the request again.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(150);
/// The longest one operation may take, retries included, before the test fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// An nginx of the test's own, serving the example with its ports replaced.
struct Nginx {
    child: Child,
    port: u16,
    _dir: PathBuf,
}

impl Nginx {
    fn start(gateways: &[u16]) -> Option<Self> {
        if let Err(error) = Command::new("nginx").arg("-v").stderr(Stdio::null()).status() {
            assert!(
                std::env::var("IDEM_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "nginx is needed (apt-get install nginx-light): {error}"
            );
            skip(&format!("behind_nginx: cannot run nginx ({error})"));
            return None;
        }
        let port = free_port();
        let mut conf = EXAMPLE.to_owned();
        let names = ["127.0.0.1:8080", "127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"];
        let ports = std::iter::once(port).chain(gateways.iter().copied());
        for (name, port) in names.iter().zip(ports) {
            assert!(conf.contains(name), "the example names {name}");
            conf = conf.replace(name, &format!("127.0.0.1:{port}"));
        }
        let dir = temp_dir();
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        // Logs and temporary files in the test's directory, not the system's (which need root).
        let d = dir.display();
        let main = format!(
            "worker_processes 1;\nevents {{ worker_connections 1024; }}\nhttp {{\n\
             access_log {d}/access.log;\nclient_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\nfastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n{conf}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-g")
            .arg(format!("daemon off; pid {};", dir.join("nginx.pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "nginx did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { child, port, _dir: dir })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would leave them serving).
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Default)]
struct Counts {
    operations: usize,
    /// Requests sent, first sends and retries.
    requests: u64,
    /// Answers the client gave up on after `CLIENT_TIMEOUT` (then sent again).
    abandoned: u64,
    /// Retries answered 409: the first run was still going on, on some gateway.
    in_flight: u64,
    /// 502/503/504 from nginx or a gateway (a gateway stopping as the request reached it).
    balancer_errors: u64,
    /// Completed operations whose final answer was a replay of an earlier run.
    replayed: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_behind_nginx_run_each_operation_once_through_a_rolling_restart() {
    let Some(redis) = service_url("IDEM_TEST_REDIS_URL") else { return };
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let Some(nginx) = Nginx::start(&ports) else { return };
    let upstream = Upstream::start().await;
    let prefix = unique("nginx");
    let separator = if redis.contains('?') { '&' } else { '?' };
    let store = format!("{redis}{separator}prefix=idem_nginx_tests");
    let start = |port: u16| {
        let listen = format!("127.0.0.1:{port}");
        Gateway::start(&upstream.url(), &store, &["--listen", &listen])
    };
    let mut gateways: Vec<Gateway> = ports.iter().map(|port| start(*port)).collect();
    let front = TestClient::new(([127, 0, 0, 1], nginx.port).into());

    let stop = Arc::new(AtomicBool::new(false));
    let counters: Arc<[AtomicU64; 5]> = Arc::default();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (front, prefix, stop, counters) =
                (front.clone(), prefix.clone(), Arc::clone(&stop), Arc::clone(&counters));
            tokio::spawn(async move {
                let mut done: Vec<(String, String, Bytes)> = Vec::new();
                for operation in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let key = format!("{prefix}-{client}-{operation}");
                    // 0 to 290 ms: about half the first answers come after the client gave up.
                    let delay = ((client * 7 + operation * 13) % 30 * 10).to_string();
                    let headers = [("x-test-delay-ms", delay.as_str())];
                    let started = Instant::now();
                    loop {
                        counters[0].fetch_add(1, Ordering::SeqCst);
                        let sent = front.post(&key, "order", &headers);
                        match tokio::time::timeout(CLIENT_TIMEOUT, sent).await {
                            Err(_) => counters[1].fetch_add(1, Ordering::SeqCst),
                            Ok(reply) => match reply.status.as_u16() {
                                201 => {
                                    if reply.is_replay() {
                                        counters[4].fetch_add(1, Ordering::SeqCst);
                                    }
                                    done.push((key, delay, reply.body));
                                    break;
                                }
                                409 => counters[2].fetch_add(1, Ordering::SeqCst),
                                502..=504 => counters[3].fetch_add(1, Ordering::SeqCst),
                                other => panic!("{key}: unexpected {other}: {:?}", reply.body),
                            },
                        };
                        assert!(started.elapsed() < PATIENCE, "{key} had no outcome in time");
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                }
                done
            })
        })
        .collect();

    // A rolling restart: each gateway stopped (it drains its open requests) and started again
    // on its port, 2 s apart.
    for index in 0..gateways.len() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = tokio::task::block_in_place(|| gateways[index].terminate());
        assert!(status.success(), "gateway {index} stopped cleanly: {status:?}");
        gateways[index] = start(ports[index]);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);

    let mut completed = Vec::new();
    for task in tasks {
        completed.extend(task.await.unwrap());
    }
    // Every completed operation, sent again through nginx: its outcome replays.
    for (key, delay, body) in &completed {
        let reply = front.post(key, "order", &[("x-test-delay-ms", delay)]).await;
        assert_eq!(reply.status.as_u16(), 201, "{key}: {:?}", reply.body);
        assert!(reply.is_replay(), "{key}: ran again instead of replaying");
        assert_eq!(reply.body, *body, "{key}: another answer");
    }
    let executions: HashMap<String, usize> = calls_per_key(&upstream, &prefix);
    let counts = Counts {
        operations: completed.len(),
        requests: counters[0].load(Ordering::SeqCst),
        abandoned: counters[1].load(Ordering::SeqCst),
        in_flight: counters[2].load(Ordering::SeqCst),
        balancer_errors: counters[3].load(Ordering::SeqCst),
        replayed: counters[4].load(Ordering::SeqCst),
    };
    let runs: usize = executions.values().sum();
    println!(
        "behind nginx, rolling restart: {} operations, {} requests, {} answers abandoned, \
         {} answered 409 (in flight), {} answered 502-504, {} completed by a replay; \
         {runs} upstream executions",
        counts.operations,
        counts.requests,
        counts.abandoned,
        counts.in_flight,
        counts.balancer_errors,
        counts.replayed
    );
    assert!(counts.operations > 100 && counts.abandoned > 0 && counts.replayed > 0, "{counts:?}");
    for (key, ..) in &completed {
        assert_eq!(executions.get(key), Some(&1), "{key} ran once");
    }
    assert_eq!(runs, counts.operations, "no execution without its operation: {counts:?}");
}
