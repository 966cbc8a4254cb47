//! The processes under test (the idem gateway, nginx) and what the kernel says about them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// A gateway process, started on free ports.
#[derive(Debug)]
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Gateway {
    pub fn start(idem: &Path, upstream: SocketAddr, store: &str) -> Result<Self, String> {
        let mut child = Command::new(idem)
            .args(["serve", "--upstream", &format!("http://{upstream}"), "--store", store])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--sweep-interval", "1h", "--max-connections", "20000"])
            .env("IDEM_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", idem.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = sender.send(line);
            }
            for _ in lines {}
        });
        let line = receiver.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            format!("idem with --store {store} did not start (see its errors above)")
        })?;
        let field = |start: &str, end: char| -> Result<SocketAddr, String> {
            let from =
                line.find(start).ok_or_else(|| format!("unexpected readiness line {line:?}"))?
                    + start.len();
            let rest = &line[from..];
            rest[..rest.find(end).unwrap_or(rest.len())]
                .parse()
                .map_err(|_| format!("bad address in {line:?}"))
        };
        Ok(Self {
            addr: field("listening on http://", ' ')?,
            admin: field("(admin http://", ')')?,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx as a plain reverse proxy in front of the same upstream.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: PathBuf,
}

impl Nginx {
    pub fn find() -> Option<PathBuf> {
        ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
    }

    pub fn start(nginx: &Path, upstream: SocketAddr, dir: PathBuf) -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| error.to_string())?
            .port();
        std::fs::create_dir_all(&dir).map_err(|error| error.to_string())?;
        // As close to idem's setup as nginx allows: one worker per core, keep-alive to the
        // upstream, no logging, request bodies buffered in memory, and no cap on requests per
        // keep-alive connection (nginx closes after 1,000 by default; idem never does).
        let config = format!(
            "worker_processes auto;\npid {dir}/nginx.pid;\nerror_log stderr error;\ndaemon off;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
               upstream app {{ server {upstream}; keepalive 256; keepalive_requests 100000000; }}\n\
               keepalive_requests 100000000;\n  keepalive_timeout 600s;\n\
               server {{\n    listen 127.0.0.1:{port};\n    client_body_buffer_size 64k;\n\
                 location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
            dir = dir.display()
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).map_err(|error| error.to_string())?;
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|error| format!("cannot start nginx: {error}"))?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(Self { child, addr, _dir: dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("nginx did not start listening".into())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The workers, found before their master dies (then they belong to init): a killed
        // master does not take its workers with it.
        let workers = children(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        for worker in workers {
            let _ = Command::new("kill").arg("-9").arg(worker.to_string()).status();
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of /proc/PID/stat after the command name; field N of proc(5) is at index N - 3.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU seconds of `pid` and its children (nginx's workers).
pub fn cpu_seconds(pid: u32) -> f64 {
    std::iter::once(pid)
        .chain(children(pid))
        .filter_map(stat_fields)
        .map(|fields| {
            let ticks: f64 =
                fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
            ticks / clock_ticks_per_second()
        })
        .sum()
}

pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            stat_fields(*candidate).is_some_and(|fields| fields[1] == pid.to_string())
        })
        .collect()
}

/// `VmHWM` (peak) or `VmRSS` (now) of `pid` and its children, in KiB.
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    std::iter::once(pid)
        .chain(children(pid))
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .sum()
}

/// Store round trips the gateway has made so far for requests (claim, complete, release,
/// renew), from its own /metrics.
pub async fn store_round_trips(admin: SocketAddr) -> f64 {
    let Some(text) = crate::load::get_text(admin, "/metrics").await else { return f64::NAN };
    text.lines()
        .filter(|line| line.starts_with("idem_store_duration_seconds_count{"))
        .filter(|line| {
            ["claim", "complete", "release", "renew"]
                .iter()
                .any(|op| line.contains(&format!("op=\"{op}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
