//! The coordinator's status page with the real binaries: fetched over
//! HTTPS as a monitor's browser fetches it (Basic credentials carrying a
//! token) and checked for the job, nodes, snapshot and failure it must
//! show; refused without credentials or to another role; and loaded in a
//! real headless Chromium (Debian's `chromium`, installed when missing),
//! which runs its script, renders it at a phone's width, saves a screenshot
//! under target/ and dumps the DOM the test reads.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use base64::Engine as _;
use fabric_integration_tests::{Fabric, http_get, pki, workspace_root};
use fabric_trust::Expect;

const ON_A_FREE_PORT: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

fn basic(token: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("browser:{token}"))
    )
}

/// A fabric with one good job (`web`, on n1 and n2) and one failed
/// (`broken`, its include missing); returns it, the coordinator's metrics
/// address, the snapshot's name and a monitor's token.
fn fabric_with_a_good_and_a_failed_job() -> (Fabric, String, String, String) {
    let fabric = Fabric::start_with_agent(2, &ON_A_FREE_PORT, &[], &[]);
    let address = fabric.coordinator.metrics_address.clone().unwrap();
    let source = fabric.dir.path().join("site");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("index.html"), "hello").unwrap();
    let missing = fabric.dir.path().join("not-there");
    let jobs = format!(
        "[job.web]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1 n2\"\ninterval = \"24h\"\n\n\
         [job.broken]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ncopy_retries = 0\n",
        source.display(),
        missing.display()
    );
    for id in fabric.submit(&jobs, &[]) {
        fabric.wait_run(&id);
    }
    let listed = fabric.json(&["snapshot", "list", "--job", "web"]);
    let name = listed[0]["name"].as_str().unwrap().to_owned();
    let token = fabric.json(&["token", "create", "--role", "monitor", "--name", "phone"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    (fabric, address, name, token)
}

#[test]
fn the_status_page_shows_jobs_nodes_snapshots_and_failures_to_monitors_only() {
    let (fabric, address, snapshot, token) = fabric_with_a_good_and_a_failed_job();
    let dir = tempfile::tempdir().unwrap();
    let anonymous = pki().transport(None, dir.path());

    // No credentials: 401, asking a browser for Basic credentials.
    let refused = http_get(&address, &anonymous, Expect::Coordinator, None, "/");
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(
        refused
            .head
            .to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"fabric\""),
        "{refused:?}"
    );
    assert_eq!(
        refused.body,
        "no client certificate or token: / needs role operator or monitor\n"
    );
    // A client's token: 403.
    let client = fabric.json(&["token", "create", "--role", "client", "--name", "web1"])["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = http_get(
        &address,
        &anonymous,
        Expect::Coordinator,
        Some(&basic(&client)),
        "/",
    );
    assert_eq!(refused.status, 403, "{refused:?}");

    // A monitor's token, as a browser sends it.
    let page = http_get(
        &address,
        &anonymous,
        Expect::Coordinator,
        Some(&basic(&token)),
        "/",
    );
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.content_type, "text/html; charset=utf-8");
    assert!(
        page.head
            .to_ascii_lowercase()
            .contains("cache-control: no-store"),
        "{page:?}"
    );
    let html = &page.body;
    for expected in [
        "<!DOCTYPE html>",
        "id=\"job-web\"",
        "id=\"job-broken\"",
        "id=\"node-n1\"",
        "id=\"node-n2\"",
        "id=\"node-client\"",
        snapshot.as_str(),
        "2/2",
        "Recent failures (1)",
        "cannot read what the job includes",
    ] {
        assert!(html.contains(expected), "{expected:?} missing from\n{html}");
    }
    // The job that failed is red, the one with its snapshot green.
    let row_of = |html: &str, id: &str| {
        let start = html.find(&format!("id=\"{id}\"")).unwrap();
        let end = start + html[start..].find("</tr>").unwrap();
        html[start..end].to_owned()
    };
    let row = |id: &str| row_of(html, id);
    assert!(row("job-web").contains("badge ok"), "{}", row("job-web"));
    assert!(
        row("job-broken").contains("badge critical") || row("job-broken").contains("badge warning"),
        "{}",
        row("job-broken")
    );

    // What a running backup is doing, and a node that is full: a slow job
    // caught while it sends, and n3 asking for more free space than any
    // disk has.
    let _full = Fabric::start_node_with(
        &fabric.dir,
        &fabric.coordinator.address,
        3,
        &["--min-free-bytes", "1000000000000000000"],
    );
    fabric.wait_online(4);
    let big = fabric.dir.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    std::fs::write(
        big.join("data"),
        fabric_integration_tests::pseudo_random(8 << 20, 25),
    )
    .unwrap();
    let slow = format!(
        "[job.slow]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\nbandwidth_limit = \"1MiB/s\"\n",
        big.display()
    );
    let run = fabric.submit(&slow, &[])[0].clone();
    let mut moving = false;
    for _ in 0..600 {
        let shown = fabric.json(&["run", "show", &run]);
        if shown["copies"][0]["bytes_sent"].as_u64().unwrap_or(0) > 0 {
            moving = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(moving, "the slow copy never started sending");
    let page = http_get(
        &address,
        &anonymous,
        Expect::Coordinator,
        Some(&basic(&token)),
        "/",
    );
    let html = &page.body;
    assert!(html.contains("Running (1)"), "{html}");
    let running = &html[html.find("Running (1)").unwrap()..html.find("<h2>Nodes").unwrap()];
    assert!(
        running.contains("slow") && running.contains("copying") && running.contains("n1"),
        "{running}"
    );
    assert!(
        running.contains(" MiB</td>") || running.contains(" KiB</td>"),
        "bytes read and sent so far: {running}"
    );
    let full = row_of(html, "node-n3");
    assert!(
        full.contains("refusing writes") && full.contains("min_free"),
        "{full}"
    );

    // An operator's certificate works too, and the refresh's fragment is
    // the body alone.
    let body = http_get(
        &address,
        &pki().operator_transport(),
        Expect::Coordinator,
        None,
        "/status/body",
    );
    assert_eq!(body.status, 200, "{body:?}");
    assert!(body.body.contains("id=\"job-web\""), "{body:?}");
    assert!(!body.body.contains("<html"), "{body:?}");
}

fn have_chromium() -> bool {
    Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Debian's chromium, installed from the package registry when missing.
fn ensure_chromium() {
    if have_chromium() {
        return;
    }
    eprintln!("chromium is missing: installing Debian's chromium");
    let installed = fabric_integration_tests::apt_install("chromium");
    assert!(
        installed && have_chromium(),
        "the browser test needs Debian's chromium, which could not be installed \
         (apt-get install chromium, as root)"
    );
}

/// Where test artefacts go: the build's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `chromium --headless` on `url` with `extra` flags, with a profile of
/// its own, no network of its own (no background connections), stopped
/// after a bounded time.
fn chromium(url: &str, profile: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .arg("120")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--ignore-certificate-errors",
            "--window-size=412,915",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap()
}

#[test]
fn a_browser_renders_the_status_page_at_a_phones_width() {
    ensure_chromium();
    let (fabric, address, snapshot, token) = fabric_with_a_good_and_a_failed_job();
    let profile = tempfile::tempdir().unwrap();
    // The fabric's CA is not the browser's: the certificate check is the
    // HTTPS test's (above, with the CA); this one is about what renders.
    let url = format!("https://browser:{token}@{address}/");

    // Virtual time long enough for the page's script to fetch its body
    // again twice.
    let dumped = chromium(
        &url,
        profile.path(),
        &["--virtual-time-budget=11000", "--dump-dom"],
    );
    assert!(dumped.status.success(), "{dumped:?}");
    let dom = String::from_utf8_lossy(&dumped.stdout);
    for expected in [
        "fabric status",
        "id=\"job-web\"",
        "id=\"node-n1\"",
        "id=\"node-n2\"",
        snapshot.as_str(),
        "cannot read what the job includes",
        "data-refreshes=\"2\"",
    ] {
        assert!(dom.contains(expected), "{expected:?} missing from\n{dom}");
    }
    assert!(!dom.contains("needs role"), "the browser was let in: {dom}");

    let screenshot = target_dir().join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let shot = chromium(
        &url,
        profile.path(),
        &[&format!("--screenshot={}", screenshot.display())],
    );
    assert!(shot.status.success(), "{shot:?}");
    let png = std::fs::read(&screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 1_000,
        "{} is no screenshot ({} bytes)",
        screenshot.display(),
        png.len()
    );
    drop(fabric);
}
