//! What the integration tests share: finding and starting the real binaries
//! on 127.0.0.1 with OS-chosen ports in temporary directories (and stopping
//! them when dropped), running `fabricctl`, generating test trees, and a
//! real etcd ([`etcd`]).

pub mod etcd;

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

/// The tests' CA, shared by every test process of a build (under the
/// target directory, made once), with the operator certificate `fabricctl`
/// uses by default.
pub struct TestPki {
    pki: fabric_trust::pki::PkiDir,
    operator: (PathBuf, PathBuf),
}

impl TestPki {
    /// The CA.
    pub fn pki(&self) -> &fabric_trust::pki::PkiDir {
        &self.pki
    }

    /// The CA certificate file.
    pub fn ca(&self) -> PathBuf {
        self.pki.ca_certificate()
    }

    /// (certificate, key) of `operator/test`.
    pub fn operator(&self) -> (PathBuf, PathBuf) {
        self.operator.clone()
    }

    /// A certificate for `role/name` in `out` (a test's own folder).
    pub fn issue(&self, role: fabric_trust::Role, name: &str, out: &Path) -> (PathBuf, PathBuf) {
        self.pki
            .issue_into(role, name, out)
            .expect("a test certificate can be issued")
    }

    /// `--tls-ca CA --tls-cert CERT --tls-key KEY` for a certificate of
    /// `role/name` issued into `out`.
    pub fn flags(&self, role: fabric_trust::Role, name: &str, out: &Path) -> Vec<String> {
        let (cert, key) = self.issue(role, name, out);
        vec![
            "--tls-ca".into(),
            path_text(&self.ca()),
            "--tls-cert".into(),
            path_text(&cert),
            "--tls-key".into(),
            path_text(&key),
        ]
    }

    /// The transport of a client holding `role/name`'s certificate
    /// (issued into `out`), or none with `None`.
    pub fn transport(
        &self,
        identity: Option<(fabric_trust::Role, &str)>,
        out: &Path,
    ) -> fabric_trust::Transport {
        let (cert, key) = match identity {
            Some((role, name)) => {
                let (cert, key) = self.issue(role, name, out);
                (Some(cert), Some(key))
            }
            None => (None, None),
        };
        fabric_trust::transport::TransportSettings {
            ca: Some(self.ca()),
            cert,
            key,
            insecure_plaintext: false,
        }
        .client()
        .expect("test credentials load")
    }

    /// The transport of `operator/test`.
    pub fn operator_transport(&self) -> fabric_trust::Transport {
        let (cert, key) = self.operator();
        fabric_trust::transport::TransportSettings {
            ca: Some(self.ca()),
            cert: Some(cert),
            key: Some(key),
            insecure_plaintext: false,
        }
        .client()
        .expect("test credentials load")
    }
}

fn path_text(path: &Path) -> String {
    path.to_str().expect("a UTF-8 path").to_owned()
}

/// The tests' CA and operator certificate (made on first use).
pub fn pki() -> &'static TestPki {
    static PKI: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"));
        let pki = fabric_trust::pki::PkiDir::open_or_init(
            &target.join("tmp").join("fabric-test-pki"),
            "fabric test CA",
        )
        .expect("the tests' CA can be made");
        // The operator's certificate is shared by every test process: made
        // whole in a folder of its own and renamed into place, like the CA.
        let operator_dir = pki.dir().join("operator");
        if !operator_dir.join("operator-test.key").exists() {
            let staging = pki
                .dir()
                .join(format!(".operator.{}.tmp", std::process::id()));
            pki.issue_into(fabric_trust::Role::Operator, "test", &staging)
                .expect("the operator certificate can be issued");
            if std::fs::rename(&staging, &operator_dir).is_err() {
                let _ = std::fs::remove_dir_all(&staging);
            }
        }
        let operator = (
            operator_dir.join("operator-test.pem"),
            operator_dir.join("operator-test.key"),
        );
        TestPki { pki, operator }
    })
}

/// A storage client of the node at `address`, as `operator/test`.
pub async fn storage_client(
    address: &str,
) -> fabric_proto::v1::storage_client::StorageClient<tonic::transport::Channel> {
    fabric_node::client::storage(
        &fabric_node::client::Peer::any_node(address),
        &pki().operator_transport(),
    )
    .await
    .expect("the node can be reached")
}

/// The snapshots the storage node at `address` holds, as an operator sees
/// them (from a synchronous test).
pub fn snapshots_on(address: &str) -> Vec<fabric_proto::v1::Snapshot> {
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(async {
            storage_client(address)
                .await
                .list_snapshots(fabric_proto::v1::ListSnapshotsRequest::default())
                .await
                .expect("the node lists its snapshots")
                .into_inner()
                .snapshots
        })
}

/// The health of the server at `address`, asked without credentials
/// (health is open to anyone).
pub async fn health(address: &str) -> tonic_health::pb::health_check_response::ServingStatus {
    let anonymous = pki().transport(None, Path::new("."));
    let channel =
        fabric_node::client::channel(&fabric_node::client::Peer::any_node(address), &anonymous)
            .await
            .expect("the server can be reached");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("the health check answers")
        .into_inner()
        .status()
}

/// The health a plaintext health port (`Server::health_address`) answers,
/// asked as a probe does: no TLS, no credentials.
pub async fn plaintext_health(
    health_address: &str,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let channel = tonic::transport::Channel::from_shared(health_address.to_owned())
        .expect("a URI")
        .connect()
        .await
        .expect("the health port can be reached");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("the health check answers")
        .into_inner()
        .status()
}

/// Send `messages` on one `Upload` of `client` and collect the replies
/// until the node ends the stream: all of them, or its first error.
pub async fn upload(
    client: &mut fabric_proto::v1::storage_client::StorageClient<tonic::transport::Channel>,
    messages: Vec<fabric_proto::v1::SenderMessage>,
) -> Result<Vec<fabric_proto::v1::ReceiverMessage>, tonic::Status> {
    use tokio_stream::StreamExt;
    let mut replies = client
        .upload(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(reply) = replies.next().await {
        out.push(reply?);
    }
    Ok(out)
}

/// Installs Debian's `package` with apt-get (updating the package lists
/// once if the first try fails); returns whether apt-get succeeded.
pub fn apt_install(package: &str) -> bool {
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|status| status.success())
    };
    install()
        || (Command::new("apt-get")
            .args(["update", "-qq"])
            .status()
            .is_ok_and(|status| status.success())
            && install())
}

/// A server process started by a test, killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `https://127.0.0.1:PORT`.
    pub address: String,
    /// `http://127.0.0.1:PORT` of its plaintext health port, when ARGS
    /// gave `--health-listen` an address.
    pub health_address: Option<String>,
    /// Where its certificate is (removed with it).
    pub tls: Option<tempfile::TempDir>,
    /// `127.0.0.1:PORT` of its metrics port, when ARGS gave
    /// `--metrics-listen` an address.
    pub metrics_address: Option<String>,
}

/// The value after `flag` in `args`.
fn flag_value<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|arg| *arg == flag)
        .and_then(|index| args.get(index + 1).copied())
}

impl Server {
    /// Start `binary serve ARGS...` and wait for its "listening on" line.
    /// Unless ARGS say `--insecure-plaintext` or give `--tls-cert`, it gets a
    /// certificate of the tests' CA: `node/ID` for a node (its `--node-id`,
    /// or the host name), `coordinator/test` for a coordinator. Unless ARGS
    /// give `--health-listen`, it has no health port, and unless they give
    /// `--metrics-listen`, no metrics port (tests run in parallel; a fixed
    /// port would clash); with `--metrics-listen 127.0.0.1:0` the port it
    /// announced is `metrics_address`.
    pub fn start(binary_name: &str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary(binary_name));
        command
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Quiet unless asked: FABRIC_TEST_LOG=info shows what the
            // servers did (GC leases, scheduled runs) while a test ran.
            .env(
                "RUST_LOG",
                std::env::var("FABRIC_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            );
        if !args.contains(&"--health-listen") {
            command.args(["--health-listen", ""]);
        }
        let wants_metrics =
            flag_value(args, "--metrics-listen").is_some_and(|value| !value.is_empty());
        if !args.contains(&"--metrics-listen") {
            command.args(["--metrics-listen", ""]);
        }
        let mut tls = None;
        if !args.contains(&"--insecure-plaintext") && !args.contains(&"--tls-cert") {
            let dir = tempfile::tempdir().expect("tempdir");
            let (role, name) = if binary_name == "fabric-coordinator" {
                (fabric_trust::Role::Coordinator, "test".to_owned())
            } else {
                let id = flag_value(args, "--node-id")
                    .map(str::to_owned)
                    .unwrap_or_else(fabric_node::config::system_hostname);
                (fabric_trust::Role::Node, id)
            };
            command.args(pki().flags(role, &name, dir.path()));
            tls = Some(dir);
        }
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
        let scheme = if args.contains(&"--insecure-plaintext") {
            "http"
        } else {
            "https"
        };
        let address = first
            .rsplit(' ')
            .next()
            .map(|addr| format!("{scheme}://{addr}"))
            .expect("an address");
        // The health port's line comes second, when there is one.
        let health_address = flag_value(args, "--health-listen")
            .filter(|listen| !listen.trim().is_empty())
            .map(|_| {
                let line = lines
                    .next()
                    .expect("the server prints its health address")
                    .expect("stdout is readable");
                let (_, addr) = line
                    .split_once(" health listening on ")
                    .unwrap_or_else(|| panic!("not a health address line: {line:?}"));
                format!("http://{addr}")
            });
        // The metrics line follows the main one (and the health line).
        let mut metrics_address = None;
        if wants_metrics {
            for line in lines.by_ref() {
                let line = line.expect("stdout is readable");
                if let Some((_, address)) = line.split_once(" metrics listening on ") {
                    metrics_address = Some(address.trim().to_owned());
                    break;
                }
            }
            assert!(
                metrics_address.is_some(),
                "the server announced no metrics port"
            );
        }
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Self {
            child,
            address,
            health_address,
            tls,
            metrics_address,
        }
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

/// Run `fabricctl ARGS...` to completion, as `operator/test` unless ARGS
/// give other credentials.
pub fn fabricctl(args: &[&str]) -> Output {
    fabricctl_command(args)
        .stdin(Stdio::null())
        .output()
        .expect("fabricctl runs")
}

/// Run `fabricctl ARGS...` with its stdout closed before it writes
/// anything (a reader that went away, `| head`): every write fails with
/// EPIPE.
pub fn fabricctl_with_closed_stdout(args: &[&str]) -> Output {
    let mut child = fabricctl_command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fabricctl runs");
    drop(child.stdout.take());
    child.wait_with_output().expect("fabricctl ends")
}

/// `fabricctl ARGS...` as `operator/test` unless ARGS give other
/// credentials, to spawn.
pub fn fabricctl_command(args: &[&str]) -> Command {
    let (cert, key) = pki().operator();
    let mut command = Command::new(binary("fabricctl"));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("FABRIC_COORDINATOR")
        .env_remove("FABRIC_TOKEN")
        .env_remove("FABRIC_INSECURE_PLAINTEXT")
        .env("FABRIC_TLS_CA", pki().ca())
        .env("FABRIC_TLS_CERT", cert)
        .env("FABRIC_TLS_KEY", key);
    command
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

/// Write a tree with many small files, a few large ones, a sparse file
/// (32 MiB, holes where the file system makes them), empty files and
/// directories, symlinks, a hard link, extended attributes (where the file
/// system keeps them), unicode names and several modes under `root`.
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
    std::fs::hard_link(
        root.join("large-text.log"),
        root.join("nested/deeper/hard-link-to-text.log"),
    )
    .expect("hard link");
    std::fs::write(
        root.join("duplicate-of-large.bin"),
        pseudo_random(large_bytes, 1),
    )
    .expect("write");
    {
        use std::os::unix::fs::FileExt;
        let sparse = std::fs::File::create(root.join("sparse.img")).expect("create");
        sparse.set_len(32 << 20).expect("set_len");
        sparse
            .write_all_at(&pseudo_random(100_000, 7), 5 << 20)
            .expect("write");
        sparse
            .write_all_at(&pseudo_random(3000, 8), (20 << 20) + 17)
            .expect("write");
    }
    std::os::unix::fs::symlink("nested/deeper", root.join("link-to-dir")).expect("symlink");
    std::os::unix::fs::symlink("does-not-exist", root.join("dangling-link")).expect("symlink");
    std::os::unix::fs::symlink("../large-text.log", root.join("nested/link-up")).expect("symlink");
    let script = root.join("run.sh");
    std::fs::write(&script, b"#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = root.join("nested/secret");
    std::fs::write(&secret, b"s3cr3t").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // Extended attributes, where the file system keeps them.
    for (path, value) in [
        (root.join("run.sh"), &b"a note on a file"[..]),
        (root.join("nested"), b"a note on a directory"),
    ] {
        let _ = rustix::fs::lsetxattr(&path, "user.fabric", value, rustix::fs::XattrFlags::empty());
    }
    let odd = root.join("nested/odd-mode");
    std::fs::write(&odd, b"odd").expect("write");
    std::fs::set_permissions(&odd, std::fs::Permissions::from_mode(0o4751)).expect("chmod");
}

/// A whole fabric of real processes: a coordinator, storage nodes n1..nN
/// (label `disk`) and a client agent `client` (host name `client-host`)
/// that allows only the commands the tests' jobs run.
pub struct Fabric {
    /// Temporary state of every process.
    pub dir: tempfile::TempDir,
    /// The coordinator.
    pub coordinator: Server,
    /// Storage nodes, n1 first.
    pub nodes: Vec<Server>,
    /// The client's agent.
    pub agent: Server,
}

impl Fabric {
    /// Start a coordinator, `storage` storage nodes and an agent; returns
    /// once the coordinator lists all of them online.
    pub fn start(storage: usize) -> Self {
        Self::start_with(storage, &[], &[])
    }

    /// [`Fabric::start`] with `coordinator_extra` flags for the coordinator
    /// and `node_extra` for every storage node.
    pub fn start_with(storage: usize, coordinator_extra: &[&str], node_extra: &[&str]) -> Self {
        Self::start_with_agent(storage, coordinator_extra, node_extra, &[])
    }

    /// [`Fabric::start_with`] with `agent_extra` flags for the client's
    /// agent (say, `--allow-command` for a test's own script).
    pub fn start_with_agent(
        storage: usize,
        coordinator_extra: &[&str],
        node_extra: &[&str],
        agent_extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let coordinator = Self::start_coordinator_with(
            &dir.path().join("coordinator"),
            "127.0.0.1:0",
            coordinator_extra,
        );
        let mut nodes = Vec::new();
        for index in 1..=storage {
            nodes.push(Self::start_node_with(
                &dir,
                &coordinator.address,
                index,
                node_extra,
            ));
        }
        let agent = Self::start_agent(&dir, &coordinator.address, agent_extra);
        let fabric = Self {
            dir,
            coordinator,
            nodes,
            agent,
        };
        fabric.wait_online(storage + 1);
        fabric
    }

    /// Start (or restart) the coordinator on `listen` with its state in `data_dir`.
    pub fn start_coordinator(data_dir: &Path, listen: &str) -> Server {
        Self::start_coordinator_with(data_dir, listen, &[])
    }

    /// [`Fabric::start_coordinator`] with `extra` flags.
    pub fn start_coordinator_with(data_dir: &Path, listen: &str, extra: &[&str]) -> Server {
        let mut args = vec![
            "--listen",
            listen,
            "--data-dir",
            data_dir.to_str().expect("utf-8"),
            "--heartbeat-interval",
            "200ms",
            "--lost-after-missed-heartbeats",
            "5",
        ];
        args.extend_from_slice(extra);
        Server::start("fabric-coordinator", &args, &[])
    }

    /// Start storage node `n<index>`.
    pub fn start_node(dir: &tempfile::TempDir, coordinator: &str, index: usize) -> Server {
        Self::start_node_with(dir, coordinator, index, &[])
    }

    /// The agent `client` (host `client-host`), its data under DIR/agent,
    /// allowed the commands the tests' jobs run and those `extra` allows.
    pub fn start_agent(dir: &tempfile::TempDir, coordinator: &str, extra: &[&str]) -> Server {
        let agent_dir = dir.path().join("agent");
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            agent_dir.to_str().expect("utf-8"),
            "--node-id",
            "client",
            "--roles",
            "agent",
            "--hostname",
            "client-host",
            "--coordinator",
            coordinator,
            // What the tests' jobs run, and nothing else.
            "--allow-command",
            "sleep 30",
            "--allow-command",
            "echo preparing",
            "--allow-command",
            "echo about to fail; exit 3",
            "--allow-command",
            "printf 'alpha\\nbeta\\n'",
            "--allow-command",
            "touch *",
            "--allow-command",
            "echo db-master-1",
        ];
        args.extend_from_slice(extra);
        Server::start("fabric-node", &args, &[])
    }

    /// Start storage node `n<index>` with `extra` flags.
    pub fn start_node_with(
        dir: &tempfile::TempDir,
        coordinator: &str,
        index: usize,
        extra: &[&str],
    ) -> Server {
        let data = dir.path().join(format!("n{index}"));
        let id = format!("n{index}");
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--node-id",
            &id,
            "--roles",
            "storage",
            "--labels",
            "disk",
            "--coordinator",
            coordinator,
        ];
        args.extend_from_slice(extra);
        Server::start("fabric-node", &args, &[])
    }

    /// `fabricctl --coordinator ADDR ARGS...`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["--coordinator", self.coordinator.address.as_str()];
        all.extend_from_slice(args);
        fabricctl(&all)
    }

    /// `fabricctl -o json --coordinator ADDR ARGS...`, asserting success.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--coordinator", self.coordinator.address.as_str()];
        all.extend_from_slice(args);
        fabricctl_json(&all)
    }

    /// Wait (bounded) until at least `count` nodes are online.
    /// Wait until the coordinator lists node `id` online at `address` (a
    /// restarted node, once it registered again).
    pub fn wait_node_at(&self, id: &str, address: &str) {
        for _ in 0..300 {
            let nodes = self.json(&["node", "list"]);
            let there = nodes.as_array().is_some_and(|nodes| {
                nodes.iter().any(|node| {
                    node["id"] == id && node["address"] == address && node["state"] == "online"
                })
            });
            if there {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("node {id} did not come online at {address}");
    }

    /// Node `id`'s row of `node list -o json`; panics when it is not listed.
    pub fn node_row(&self, id: &str) -> serde_json::Value {
        self.json(&["node", "list"])
            .as_array()
            .and_then(|nodes| nodes.iter().find(|node| node["id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("node {id} is not listed"))
    }

    pub fn wait_online(&self, count: usize) {
        for _ in 0..300 {
            let nodes = self.json(&["node", "list"]);
            let online = nodes
                .as_array()
                .map(|nodes| nodes.iter().filter(|n| n["state"] == "online").count())
                .unwrap_or(0);
            if online >= count {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{count} nodes did not come online");
    }

    /// Write `text` as a jobs file and submit it (with `select`); returns the runs' ids.
    pub fn submit(&self, text: &str, select: &[&str]) -> Vec<String> {
        let file = self.dir.path().join("jobs.toml");
        std::fs::write(&file, text).expect("write jobs");
        let mut args = vec!["job", "submit", "-f", file.to_str().expect("utf-8")];
        args.extend_from_slice(select);
        let runs = self.json(&args);
        runs.as_array()
            .expect("a list of runs")
            .iter()
            .map(|run| run["id"].as_str().expect("an id").to_owned())
            .collect()
    }

    /// Wait (bounded) until run `id` is done, failed or cancelled; returns it.
    pub fn wait_run(&self, id: &str) -> serde_json::Value {
        for _ in 0..1200 {
            let run = self.json(&["run", "show", id]);
            if matches!(run["state"].as_str(), Some("done" | "failed" | "cancelled")) {
                return run;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("run {id} did not end");
    }

    /// The runs of `job` (newest first).
    pub fn runs_of(&self, job: &str) -> Vec<serde_json::Value> {
        self.json(&["run", "list", "--job", job])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// `fabricctl restore ID SOURCE --to <dir>/NAME EXTRA...` of the tree
    /// backed up from `source` (its path inside the snapshot), asserting
    /// that it succeeds and that the result is identical to `source`;
    /// what fabricctl said on stderr.
    pub fn restore_matching(&self, id: &str, source: &Path, name: &str, extra: &[&str]) -> String {
        let target = self.dir.path().join(name);
        let inside = source
            .to_str()
            .expect("utf-8")
            .trim_start_matches('/')
            .to_owned();
        let mut args = vec![
            "restore",
            id,
            inside.as_str(),
            "--to",
            target.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        let output = self.ctl(&args);
        assert!(output.status.success(), "{output:?}");
        fabricctl::compare::compare_trees(
            source,
            &target,
            false,
            fabric_chunkstore::restore::RestorePolicy::default(),
        )
        .expect("the restored tree matches its source");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

/// What a metrics port answered.
#[derive(Clone, Debug)]
pub struct Scraped {
    /// The HTTP status.
    pub status: u16,
    /// The response's head: status line and headers.
    pub head: String,
    /// Its `content-type`.
    pub content_type: String,
    /// The body.
    pub body: String,
}

/// `GET path` on the metrics port at `address` (`127.0.0.1:PORT`) over
/// HTTP/1.1 and TLS, with `transport`'s certificate (if any) and `token` as
/// a bearer token (if given); the server must prove `expect`.
pub fn scrape(
    address: &str,
    transport: &fabric_trust::Transport,
    expect: fabric_trust::Expect,
    token: Option<&str>,
    path: &str,
) -> Scraped {
    let authorization = token.map(|token| format!("Bearer {token}"));
    http_get(address, transport, expect, authorization.as_deref(), path)
}

/// `GET path` on the metrics port at `address` as [`scrape`] does, with
/// `authorization` (the header's whole value) if given.
pub fn http_get(
    address: &str,
    transport: &fabric_trust::Transport,
    expect: fabric_trust::Expect,
    authorization: Option<&str>,
    path: &str,
) -> Scraped {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fabric_trust::Transport::Tls(credentials) = transport else {
        panic!("scrape speaks TLS");
    };
    let mut config = (*credentials.client_config(expect).expect("a client config")).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some(authorization) = authorization {
        request.push_str(&format!("Authorization: {authorization}\r\n"));
    }
    request.push_str("\r\n");
    let response = tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(async {
            let tcp = tokio::net::TcpStream::connect(address)
                .await
                .expect("the metrics port accepts");
            let name =
                tokio_rustls::rustls::pki_types::ServerName::try_from("fabric").expect("a name");
            let mut stream = connector
                .connect(name, tcp)
                .await
                .expect("the TLS handshake");
            stream
                .write_all(request.as_bytes())
                .await
                .expect("the request is sent");
            let mut response = Vec::new();
            // A peer closing without close_notify is fine once the body is in.
            let _ = stream.read_to_end(&mut response).await;
            String::from_utf8(response).expect("a UTF-8 response")
        });
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Scraped {
        status,
        head: head.to_owned(),
        content_type,
        body,
    }
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut text: &str) -> String {
    let mut body = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        body.push_str(&rest[..size]);
        text = rest[size..].trim_start_matches("\r\n");
    }
    body
}

/// The samples of an OpenMetrics text: `name{labels}` (as written) ->
/// value. Panics on a line that is not a comment or a sample, and when the
/// text does not end with `# EOF`.
pub fn parse_openmetrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF: {text}"
    );
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            (
                series.to_owned(),
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("a value in {line:?}")),
            )
        })
        .collect()
}

/// Remote TCP ports of the connections process `pid` holds now (from
/// /proc/PID/fd and /proc/PID/net/tcp{,6}).
pub fn remote_ports(pid: u32) -> std::collections::HashSet<u16> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut ports = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9
                && inodes.contains(fields[9])
                && let Some(port) = fields[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// The port of an `https://host:port` address.
pub fn port_of(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("an address with a port")
}
