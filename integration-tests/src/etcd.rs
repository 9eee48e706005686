//! A real etcd server for the tests of the highly available coordinator:
//! Debian's `etcd-server`, installed when missing, started on loopback
//! ports of its own with its data in a temporary directory, and killed when
//! dropped. A test can kill and restart it on the same data.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian puts etcd.
const ETCD: &str = "/usr/bin/etcd";

/// A one-member etcd cluster on 127.0.0.1.
pub struct EtcdServer {
    child: Option<Child>,
    /// Its data directory's parent (removed with it).
    pub dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`, its client URL.
    pub client_url: String,
    peer_url: String,
}

/// A port free now on 127.0.0.1 (etcd cannot announce an OS-chosen one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on 127.0.0.1")
}

fn installed() -> bool {
    Command::new(ETCD)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Installs `etcd-server` from Debian when etcd is missing; false when it
/// could not be. One test at a time: apt-get holds a lock. (The package may
/// start a system etcd on the default ports; the tests use ports of their
/// own.)
pub fn ensure_installed() -> bool {
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if installed() {
        return true;
    }
    eprintln!("etcd is missing: installing etcd-server");
    crate::apt_install("etcd-server");
    installed()
}

impl EtcdServer {
    /// Starts etcd, installing it first when missing; `None` when it cannot
    /// be installed here.
    pub fn start() -> Option<Self> {
        if !ensure_installed() {
            return None;
        }
        let mut server = Self {
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
        };
        server.spawn();
        Some(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("etcd")
    }

    fn spawn(&mut self) {
        let child = Command::new(ETCD)
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("test={}", self.peer_url)])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&self) {
        let address = self.client_url.trim_start_matches("http://").to_owned();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if health_ok(&address) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd at {} did not become healthy in 30 s",
                self.client_url
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// Whether etcd at `address` answers `GET /health` with `"health":"true"`.
fn health_ok(address: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(format!("GET /health HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
