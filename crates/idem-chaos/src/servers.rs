//! The processes the rig owns and breaks: its stores and its gateways.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idem_core::conformance::servers::PrivatePostgres;

/// Which store the gateways share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Postgres,
    Redis,
    Sqlite,
}

/// A store server of the rig's own (or, for SQLite, a file).
pub enum Store {
    Postgres(PrivatePostgres),
    Redis { child: Child, port: u16, dir: PathBuf },
    Sqlite { path: PathBuf },
}

impl Store {
    pub fn start(kind: StoreKind, dir: &Path) -> Result<Self, String> {
        match kind {
            StoreKind::Postgres => {
                let port = free_port()?;
                PrivatePostgres::start(port)
                    .map(Store::Postgres)
                    .ok_or_else(|| "no PostgreSQL binaries to make a cluster with".to_owned())
            }
            StoreKind::Redis => {
                let port = free_port()?;
                let dir = dir.join("redis");
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let child = start_redis(port, &dir)?;
                Ok(Store::Redis { child, port, dir })
            }
            StoreKind::Sqlite => Ok(Store::Sqlite { path: dir.join("idem.db") }),
        }
    }

    pub fn url(&self) -> String {
        match self {
            Store::Postgres(postgres) => format!("{}?pool_max_size=16", postgres.url()),
            Store::Redis { port, .. } => format!("redis://127.0.0.1:{port}"),
            Store::Sqlite { path } => format!("sqlite://{}", path.display()),
        }
    }

    /// How many gateways share it (SQLite: two processes on one file).
    pub fn gateways(&self) -> usize {
        match self {
            Store::Sqlite { .. } => 2,
            _ => 3,
        }
    }

    /// Whether the rig can restart and pause it (a file has no server).
    pub fn has_server(&self) -> bool {
        !matches!(self, Store::Sqlite { .. })
    }

    /// Crashes the server and starts it again on the same data: PostgreSQL stopped
    /// `immediate` (recovery at start), Redis `kill -9` (its AOF, fsync always, replayed).
    pub fn restart(&mut self) -> Result<(), String> {
        match self {
            Store::Postgres(postgres) => {
                postgres.stop("immediate");
                postgres.start_again();
                Ok(())
            }
            Store::Redis { child, port, dir } => {
                let _ = child.kill();
                let _ = child.wait();
                *child = start_redis(*port, dir)?;
                Ok(())
            }
            Store::Sqlite { .. } => Ok(()),
        }
    }

    /// The store's processes, to pause with SIGSTOP.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Store::Postgres(postgres) => {
                let pattern = format!("idem-pg-{}-", postgres.port());
                let postmaster = pgrep(&["-f", &pattern]);
                let mut all = postmaster.clone();
                for pid in postmaster {
                    all.extend(pgrep(&["-P", &pid.to_string()]));
                }
                all
            }
            Store::Redis { child, .. } => vec![child.id()],
            Store::Sqlite { .. } => Vec::new(),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Store::Redis { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_redis(port: u16, dir: &Path) -> Result<Child, String> {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| format!("cannot start redis-server: {error}"))?;
    let mut child = child;
    if let Err(error) = wait_listening(port, Duration::from_secs(10)) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(error);
    }
    Ok(child)
}

fn pgrep(args: &[&str]) -> Vec<u32> {
    let output = Command::new("pgrep").args(args).output();
    output
        .map(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|line| line.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `signal` (`STOP`, `CONT`) to `pids`.
pub fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(u32::to_string))
        .status();
}

pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

fn wait_listening(port: u16, within: Duration) -> Result<(), String> {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > within {
            return Err(format!("nothing listens on 127.0.0.1:{port} after {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The lease every gateway of the rig runs with.
pub const LEASE: Duration = Duration::from_secs(5);

/// One `idem serve` process.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
}

impl Gateway {
    /// Starts `idem serve` (on `listen`, or a free port) in front of `upstream` (a base URL
    /// whose path names this process to the upstream) and waits for its readiness line.
    pub fn start(
        idem: &Path,
        upstream: &str,
        store: &str,
        listen: Option<SocketAddr>,
        log: &Path,
        extra: &[String],
    ) -> Result<Self, String> {
        let listen = listen.map_or_else(|| "127.0.0.1:0".to_owned(), |addr| addr.to_string());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(idem)
            .args(["serve", "--upstream", upstream, "--store", store])
            .args(["--listen", &listen, "--admin-listen", "127.0.0.1:0"])
            .args(["--lease", &format!("{}s", LEASE.as_secs())])
            .args(["--upstream-timeout", "1s", "--upstream-abandon-after", "20s"])
            .args(["--max-wait", "5s", "--ttl", "1h", "--sweep-interval", "1h"])
            .args(extra)
            .env("IDEM_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", idem.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = sender.send(line);
            }
            for _ in lines {}
        });
        let line = match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                return Err(format!("idem serve did not start: {:?}", child.wait()));
            }
        };
        // "idem listening on http://A (admin http://B) -> upstream"
        let addr = line
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|addr| addr.parse().ok());
        match addr {
            Some(addr) => Ok(Self { child, addr }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("unexpected first line from idem serve: {line}"))
            }
        }
    }

    /// SIGKILL: nothing of the gateway's own cleanup runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}
