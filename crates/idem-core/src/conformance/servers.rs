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
        Self::start_with(port, None)
    }

    /// Like [`PrivatePostgres::start`], with TLS on (`ssl = on`, the server certificate and
    /// key of `certificates`) and a `pg_hba.conf` that accepts TCP connections over TLS only
    /// (`hostssl`), so a connection without TLS is refused: a test that connects proves it
    /// used TLS.
    pub fn start_tls(port: u16, certificates: &TestCertificates) -> Option<Self> {
        Self::start_with(port, Some(certificates))
    }

    fn start_with(port: u16, tls: Option<&TestCertificates>) -> Option<Self> {
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
        if let Some(certificates) = tls {
            server.enable_tls(certificates);
        }
        server.start_again();
        Some(server)
    }

    /// Copies the server's certificate and key in (the key readable by the server's user
    /// only, as PostgreSQL demands), turns TLS on and allows TCP over TLS only.
    fn enable_tls(&self, certificates: &TestCertificates) {
        let data = self.dir.join("data");
        std::fs::copy(&certificates.server_cert, data.join("server.crt")).expect("copy the cert");
        std::fs::copy(&certificates.server_key, data.join("server.key")).expect("copy the key");
        let mut settings = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.auto.conf"))
            .expect("the cluster's settings");
        std::io::Write::write_all(
            &mut settings,
            b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )
        .expect("the TLS settings");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .expect("pg_hba.conf");
        let key = data.join("server.key").display().to_string();
        let cert = data.join("server.crt").display().to_string();
        if let Some(user) = self.user {
            let status = Command::new("chown").arg(format!("{user}:")).args([&key, &cert]).status();
            assert!(status.is_ok_and(|s| s.success()), "chown the server's key to {user}");
        }
        let status = Command::new("chmod").args(["600", &key]).status();
        assert!(status.is_ok_and(|s| s.success()), "chmod 600 the server's key");
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

/// A test's own certificate authority, made with the `openssl` command in a temporary
/// directory (removed when dropped): a CA, a server certificate it signed for `localhost` and
/// `127.0.0.1`, and a second CA that signed nothing (the wrong one to trust).
#[derive(Debug)]
pub struct TestCertificates {
    dir: PathBuf,
    /// The CA that signed the server's certificate (PEM).
    pub ca: PathBuf,
    /// A CA that did not (PEM).
    pub wrong_ca: PathBuf,
    /// The server's certificate (PEM), for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// The server's private key (PEM).
    pub server_key: PathBuf,
}

impl TestCertificates {
    /// Makes them. `None`, after a SKIPPED line (or a failure under
    /// `IDEM_REQUIRE_SERVICES=1`), when this machine has no `openssl` command.
    pub fn make() -> Option<Self> {
        if Command::new("openssl").arg("version").output().is_err() {
            let reason = "no openssl command to make test certificates with";
            if std::env::var("IDEM_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("{reason}, and IDEM_REQUIRE_SERVICES=1");
            }
            super::skip(reason);
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "idem-tls-{}-{:x}",
            std::process::id(),
            crate::FencingToken::generate().as_u64()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = |name: &str| dir.join(name).display().to_string();
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl runs");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let ca_extensions = [
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ];
        for (name, subject) in [("ca", "/CN=idem test CA"), ("wrong-ca", "/CN=idem wrong CA")] {
            let (key, cert) = (path(&format!("{name}.key")), path(&format!("{name}.pem")));
            let mut args = vec!["req", "-x509", "-newkey", "ec", "-pkeyopt"];
            args.extend(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]);
            args.extend(["-subj", subject, "-keyout", &key, "-out", &cert]);
            args.extend(ca_extensions);
            openssl(&args);
        }
        let (key, request, cert) = (path("server.key"), path("server.csr"), path("server.pem"));
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &request,
        ]);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("the server certificate's extensions");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &request,
            "-CA",
            &path("ca.pem"),
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &path("server.ext"),
            "-out",
            &cert,
        ]);
        Some(Self {
            ca: dir.join("ca.pem"),
            wrong_ca: dir.join("wrong-ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            dir,
        })
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` of a test's own that speaks TLS only (`--port 0 --tls-port PORT`), with
/// the server certificate of a [`TestCertificates`]; killed when dropped.
#[derive(Debug)]
pub struct TlsRedis {
    child: std::process::Child,
    port: u16,
}

impl TlsRedis {
    /// Starts it on `127.0.0.1:port`. `None`, after a SKIPPED line (or a failure under
    /// `IDEM_REQUIRE_SERVICES=1`), when `redis-server` cannot be started.
    pub fn start(port: u16, certificates: &TestCertificates) -> Option<Self> {
        let spawned = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--tls-cert-file")
            .arg(&certificates.server_cert)
            .arg("--tls-key-file")
            .arg(&certificates.server_key)
            .arg("--tls-ca-cert-file")
            .arg(&certificates.ca)
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&certificates.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                let reason = format!("cannot start redis-server ({error})");
                if std::env::var("IDEM_REQUIRE_SERVICES").as_deref() == Ok("1") {
                    panic!("{reason}, and IDEM_REQUIRE_SERVICES=1");
                }
                super::skip(&reason);
                return None;
            }
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("redis-server with TLS on {port} exited ({status}): does it support TLS?");
            }
            assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self { child, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on now (the system picks it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}
