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
    Redis(Redis),
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
            StoreKind::Redis => Redis::start(&dir.join("redis")).map(Store::Redis),
            StoreKind::Sqlite => Ok(Store::Sqlite { path: dir.join("idem.db") }),
        }
    }

    pub fn url(&self) -> String {
        match self {
            Store::Postgres(postgres) => format!("{}?pool_max_size=16", postgres.url()),
            Store::Redis(redis) => redis.url(),
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
            Store::Redis(redis) => redis.restart(),
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
            Store::Redis(redis) => vec![redis.child.id()],
            Store::Sqlite { .. } => Vec::new(),
        }
    }
}

/// A `redis-server` of the rig's own, its AOF (fsync always) in a directory of its own.
pub struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    pub fn start(dir: &Path) -> Result<Self, String> {
        let port = free_port()?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let child = start_redis(port, dir)?;
        Ok(Self { child, port, dir: dir.to_path_buf() })
    }

    /// `kill -9`, then a start that replays the AOF.
    pub fn restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = start_redis(self.port, &self.dir)?;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a `redis-server` on `port` with its AOF (fsync always) in `dir`, and waits until it
/// answers `PING` (after a crash it first replays its AOF, refusing commands meanwhile).
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
    if let Err(error) = wait_redis_ready(port, Duration::from_secs(120)) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(error);
    }
    Ok(child)
}

/// Waits until the Redis on `port` answers `PING` with `PONG` (not `-LOADING`).
fn wait_redis_ready(port: u16, within: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let started = Instant::now();
    loop {
        let answer = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"PING\r\n")?;
            let mut reply = [0u8; 64];
            let read = stream.read(&mut reply)?;
            Ok(String::from_utf8_lossy(&reply[..read]).into_owned())
        });
        match answer {
            Ok(reply) if reply.starts_with("+PONG") => return Ok(()),
            other if started.elapsed() > within => {
                return Err(format!(
                    "redis-server on {port} not ready after {within:?}: {other:?}"
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
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

pub fn wait_listening(port: u16, within: Duration) -> Result<(), String> {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > within {
            return Err(format!("nothing listens on 127.0.0.1:{port} after {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A RabbitMQ node of the rig's own: its own node name, AMQP and distribution ports, data
/// and log directories, and no plugins, beside (never touching) the machine's shared one.
pub struct Rabbit {
    child: Child,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
}

impl Rabbit {
    pub fn start(dir: &Path) -> Result<Self, String> {
        let (port, dist_port) = (free_port()?, free_port()?);
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n").map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .map_err(|e| e.to_string())?;
        let child = Self::spawn(port, dist_port, dir)?;
        Ok(Self { child, port, dist_port, dir: dir.to_path_buf() })
    }

    fn spawn(port: u16, dist_port: u16, dir: &Path) -> Result<Child, String> {
        use std::os::unix::process::CommandExt;
        let server = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        let server = if server.exists() { server } else { Path::new("rabbitmq-server") };
        let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(server)
            .current_dir(dir)
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", format!("idemchaos{port}@localhost"))
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            // Its own process group: a crash kills the script, the VM and its helpers at once.
            .process_group(0)
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|error| format!("cannot start rabbitmq-server: {error}"))?;
        if let Err(error) = wait_listening(port, Duration::from_secs(120)) {
            kill_group(&mut child);
            return Err(format!("{error} (see {})", dir.join("server.log").display()));
        }
        Ok(child)
    }

    /// `kill -9` of the node, then a start on the same data (once the old one has let go of
    /// its port, so the readiness wait cannot meet it).
    pub fn restart(&mut self) -> Result<(), String> {
        kill_group(&mut self.child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Self::spawn(self.port, self.dist_port, &self.dir)?;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// What `rabbitmqctl ARGS` says about this node (its cookie is in the node's HOME), or
    /// why it said nothing, within 60 s.
    pub fn ctl(&self, args: &[&str]) -> String {
        let ctl = Path::new("/usr/lib/rabbitmq/bin/rabbitmqctl");
        // Not /usr/sbin/rabbitmqctl: that one runs as the rabbitmq user, with its HOME.
        let ctl = if ctl.exists() { ctl } else { Path::new("rabbitmqctl") };
        let mut command = Command::new(ctl);
        command
            .env("HOME", &self.dir)
            .args(["-q", "-n", &format!("idemchaos{}@localhost", self.port)])
            .args(args);
        output_within(command, Duration::from_secs(60))
    }
}

/// `command`'s stdout and stderr, or why there are none; killed after `within`.
pub fn output_within(mut command: Command, within: Duration) -> String {
    let child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => return format!("cannot run {command:?}: {error}"),
    };
    let started = Instant::now();
    while matches!(child.try_wait(), Ok(None)) && started.elapsed() < within {
        std::thread::sleep(Duration::from_millis(100));
    }
    let timed_out = matches!(child.try_wait(), Ok(None));
    if timed_out {
        let _ = child.kill();
    }
    let output = child.wait_with_output();
    let mut text = output.map_or_else(
        |error| error.to_string(),
        |output| {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            text
        },
    );
    if timed_out {
        text.push_str(&format!("(no answer within {within:?})"));
    }
    text
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// SIGKILL to the process group `child` leads.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill").args(["-9", "--", &format!("-{}", child.id())]).status();
    let _ = child.wait();
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
