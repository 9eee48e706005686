//! What the integration tests share: finding and starting the real binaries
//! on 127.0.0.1 with OS-chosen ports in temporary directories (and stopping
//! them when dropped), running `fabricctl`, and generating test trees.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

static BUILD: Once = Once::new();

/// The path of one of the fabric's binaries, built once per test process
/// (a no-op when `cargo test --workspace` already built them).
pub fn binary(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--quiet",
                "--bin",
                "fabric-node",
                "--bin",
                "fabric-coordinator",
                "--bin",
                "fabricctl",
            ])
            .status()
            .expect("cargo can be run");
        assert!(status.success(), "building the binaries failed");
    });
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("debug").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A server process started by a test, killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub address: String,
}

impl Server {
    /// Start `binary serve ARGS...` and wait for its "listening on" line.
    pub fn start(binary_name: &str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary(binary_name));
        command
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "warn");
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the server starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines
            .next()
            .expect("the server prints its address")
            .expect("stdout is readable");
        let address = first
            .rsplit(' ')
            .next()
            .map(|addr| format!("http://{addr}"))
            .expect("an address");
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Self { child, address }
    }

    /// A storage node (and agent) on 127.0.0.1:0 with its store in `data_dir`.
    pub fn node(data_dir: &Path, extra: &[&str]) -> Self {
        let dir = data_dir.to_str().expect("a UTF-8 temp path");
        let mut args = vec!["--listen", "127.0.0.1:0", "--data-dir", dir];
        args.extend_from_slice(extra);
        Self::start("fabric-node", &args, &[])
    }

    /// The port, for messages.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send SIGTERM and wait for the process to exit; returns whether it
    /// exited successfully.
    pub fn terminate(mut self) -> bool {
        signal(self.child.id(), rustix::process::Signal::TERM);
        let status = self.child.wait().expect("the server can be waited for");
        status.success()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send `signal` to process `pid`.
pub fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Run `fabricctl ARGS...` to completion.
pub fn fabricctl(args: &[&str]) -> Output {
    Command::new(binary("fabricctl"))
        .args(args)
        .stdin(Stdio::null())
        .env("RUST_LOG", "warn")
        .env_remove("FABRIC_COORDINATOR")
        .output()
        .expect("fabricctl runs")
}

/// `fabricctl ARGS...`, asserting success; returns stdout.
pub fn fabricctl_ok(args: &[&str]) -> String {
    let output = fabricctl(args);
    assert!(
        output.status.success(),
        "fabricctl {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `fabricctl -o json ARGS...`, parsed.
pub fn fabricctl_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let stdout = fabricctl_ok(&all);
    serde_json::from_str(&stdout).unwrap_or_else(|err| panic!("not JSON ({err}): {stdout}"))
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no data files.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Write a tree with many small files, a few large ones, empty files and
/// directories, symlinks, unicode names and several modes under `root`.
pub fn generate_tree(root: &Path, small_files: usize, large_bytes: usize) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("empty-dir")).expect("mkdir");
    std::fs::create_dir_all(root.join("nested/deeper/deepest")).expect("mkdir");
    std::fs::create_dir_all(root.join("ünïcødé 目录")).expect("mkdir");
    for index in 0..small_files {
        let dir = match index % 3 {
            0 => root.join("nested"),
            1 => root.join("nested/deeper"),
            _ => root.join("ünïcødé 目录"),
        };
        let len = (index * 37) % 3000;
        std::fs::write(
            dir.join(format!("small-{index}.txt")),
            pseudo_random(len, index as u64),
        )
        .expect("write");
    }
    std::fs::write(root.join("empty-file"), b"").expect("write");
    std::fs::write(
        root.join("nested/deeper/deepest/large-1.bin"),
        pseudo_random(large_bytes, 1),
    )
    .expect("write");
    let text: Vec<u8> = (0..large_bytes / 2)
        .flat_map(|i| format!("line {i} of a text-like file\n").into_bytes())
        .take(large_bytes / 2)
        .collect();
    std::fs::write(root.join("large-text.log"), text).expect("write");
    std::fs::write(
        root.join("duplicate-of-large.bin"),
        pseudo_random(large_bytes, 1),
    )
    .expect("write");
    std::os::unix::fs::symlink("nested/deeper", root.join("link-to-dir")).expect("symlink");
    std::os::unix::fs::symlink("does-not-exist", root.join("dangling-link")).expect("symlink");
    std::os::unix::fs::symlink("../large-text.log", root.join("nested/link-up")).expect("symlink");
    let script = root.join("run.sh");
    std::fs::write(&script, b"#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = root.join("nested/secret");
    std::fs::write(&secret, b"s3cr3t").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let odd = root.join("nested/odd-mode");
    std::fs::write(&odd, b"odd").expect("write");
    std::fs::set_permissions(&odd, std::fs::Permissions::from_mode(0o4751)).expect("chmod");
}
