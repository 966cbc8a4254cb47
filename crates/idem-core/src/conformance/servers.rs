//! Servers a test owns, to stop, kill and restart without touching the shared ones on the
//! standard ports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A throwaway PostgreSQL cluster (`initdb` + `pg_ctl` from the machine's PostgreSQL, in a
/// temporary directory, on a port of the test's own), stopped and removed when dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// Run the server as this user (`initdb` refuses root).
    user: Option<&'static str>,
}

impl PrivatePostgres {
    /// Makes and starts a cluster listening on `127.0.0.1:port`. `None`, after a SKIPPED line
    /// (or a failure under `IDEM_REQUIRE_SERVICES=1`), when this machine has no PostgreSQL
    /// binaries to make one with.
    pub fn start(port: u16) -> Option<Self> {
        let Some(bin) = postgres_bin() else {
            let reason = "no PostgreSQL binaries under /usr/lib/postgresql/*/bin";
            if std::env::var("IDEM_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("{reason}, and IDEM_REQUIRE_SERVICES=1");
            }
            super::skip(reason);
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "idem-pg-{port}-{}-{:x}",
            std::process::id(),
            crate::FencingToken::generate().as_u64()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let user = is_root().then_some("postgres");
        if let Some(user) = user {
            let status = Command::new("chown").arg(format!("{user}:")).arg(&dir).status();
            assert!(status.is_ok_and(|s| s.success()), "chown {} to {user}", dir.display());
        }
        let server = Self { bin, dir, port, user };
        let data = server.data();
        server.run("initdb", &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"]);
        std::fs::write(
            server.dir.join("data/postgresql.auto.conf"),
            format!(
                "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
                 fsync = off\nmax_connections = 200\n",
                server.dir.display()
            ),
        )
        .expect("the cluster's settings");
        server.start_again();
        Some(server)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the (stopped) server and waits until it accepts connections.
    pub fn start_again(&self) {
        let log = format!("{}/server.log", self.dir.display());
        self.run("pg_ctl", &["start", "-D", &self.data(), "-l", &log, "-w", "-t", "60"]);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "PostgreSQL did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server: `fast` (sessions are cut, a clean shutdown) or `immediate` (no
    /// shutdown checkpoint, as after a crash: recovery runs at the next start).
    pub fn stop(&self, mode: &str) {
        self.run("pg_ctl", &["stop", "-D", &self.data(), "-m", mode, "-w", "-t", "60"]);
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.display())
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut command = match self.user {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&program);
                command
            }
            None => Command::new(&program),
        };
        let output = command.args(args).current_dir(&self.dir).output().expect("runs");
        assert!(
            output.status.success(),
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.data();
        let program = self.bin.join("pg_ctl");
        let args = ["stop", "-D", data.as_str(), "-m", "immediate", "-w"];
        let _ = match self.user {
            Some(user) => {
                Command::new("runuser").args(["-u", user, "--"]).arg(&program).args(args).output()
            }
            None => Command::new(&program).args(args).output(),
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // The owner of /proc/self is this process's effective user.
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(Path::new("/proc/self")).expect("/proc"))
        == 0
}
