//! A flaky network: the whole fabric (coordinator, two storage nodes, an
//! agent, fabricctl) in a network namespace of its own, whose loopback
//! delays and drops packets (`tc netem`; on a kernel without netem, a
//! throttled link whose short queue drops what overflows it), backs up,
//! copies to both nodes and restores byte for byte.
//!
//! The outer test re-runs this test binary under `unshare --net` (so only
//! that process and its children see the namespace), installing iproute2
//! first when `tc` is missing. Where namespaces are not permitted (no
//! root, a locked-down container) it says so and passes without running.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use fabric_integration_tests::{Fabric, generate_tree};

/// Set in the re-run process inside the namespace.
const INSIDE: &str = "FABRIC_NETEM_INSIDE";

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|output| output.status.success())
}

#[test]
fn a_backup_and_restore_get_through_loss_and_delay() {
    if !have("tc", "-V") {
        eprintln!("tc is missing: installing iproute2");
        let installed = Command::new("apt-get")
            .args(["install", "-y", "-qq", "iproute2"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|status| status.success())
            || (Command::new("apt-get")
                .args(["update", "-qq"])
                .status()
                .is_ok_and(|status| status.success())
                && Command::new("apt-get")
                    .args(["install", "-y", "-qq", "iproute2"])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status()
                    .is_ok_and(|status| status.success()));
        if !installed || !have("tc", "-V") {
            eprintln!("SKIPPED: tc (iproute2) is not available and could not be installed");
            return;
        }
    }
    if !Command::new("unshare")
        .args(["--net", "true"])
        .status()
        .is_ok_and(|status| status.success())
    {
        eprintln!("SKIPPED: network namespaces are not permitted here (unshare --net failed)");
        return;
    }
    // Built out here: the re-run has no network to fetch anything with.
    fabric_integration_tests::binary("fabricctl");
    let this = std::env::current_exe().unwrap();
    let output = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(&this)
        .args([
            "inside_a_flaky_namespace",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(INSIDE, "1")
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains("1 passed"),
        "the inner test did not run: {said}"
    );
    for line in said.lines().filter(|line| {
        line.contains("loopback") || line.contains("netem is not") || line.contains("dropped")
    }) {
        eprintln!("{line}");
    }
}

/// The body of [`a_backup_and_restore_get_through_loss_and_delay`], run
/// only by it (inside the namespace).
#[test]
#[ignore = "run by a_backup_and_restore_get_through_loss_and_delay in a namespace of its own"]
fn inside_a_flaky_namespace() {
    if std::env::var_os(INSIDE).is_none() {
        eprintln!("not inside the test's network namespace: nothing to do");
        return;
    }
    let run = |program: &str, args: &[&str]| {
        let output = Command::new(program).args(args).output().unwrap();
        assert!(output.status.success(), "{program} {args:?}: {output:?}");
    };
    // Ethernet-sized packets, as between machines (and under a token
    // bucket's burst).
    run("ip", &["link", "set", "lo", "mtu", "1500", "up"]);
    // 10 ms each way, give or take 5, and one packet in a hundred lost.
    let netem = Command::new("tc")
        .args([
            "qdisc", "add", "dev", "lo", "root", "netem", "delay", "10ms", "5ms", "loss", "1%",
        ])
        .output()
        .unwrap();
    if netem.status.success() {
        eprintln!("loopback: netem, 10 ms +- 5 ms delay, 1% loss");
    } else {
        // A kernel built without sch_netem: a slow link that drops what
        // overflows its short queue instead (tail drops, not random ones).
        eprintln!(
            "netem is not available ({}): loopback throttled to 8 Mbit/s with a 48 KB queue \
             (drops when it overflows) instead",
            String::from_utf8_lossy(&netem.stderr).trim()
        );
        run(
            "tc",
            &[
                "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "8mbit", "burst", "16kb",
                "limit", "48kb",
            ],
        );
    }

    let fabric = Fabric::start(2);
    let source = fabric.dir.path().join("source");
    generate_tree(&source, 40, 2 * 1024 * 1024);
    let jobs = format!(
        "[job.flaky]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &[]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run:#}");
    let id = run["copies"][0]["snapshot_id"].as_str().unwrap().to_owned();
    for node in ["n1", "n2"] {
        fabric.restore_matching(
            &id,
            &source,
            &format!("restored-from-{node}"),
            &["--node", node],
        );
    }
    // What the link did to the packets, for whoever reads the log.
    if let Ok(stats) = Command::new("tc")
        .args(["-s", "qdisc", "show", "dev", "lo"])
        .output()
    {
        eprintln!("{}", String::from_utf8_lossy(&stats.stdout));
    }
}
