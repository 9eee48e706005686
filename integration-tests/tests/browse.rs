//! Looking into snapshots and restoring next to what is already there, as
//! an operator does it: `fabricctl ls`, `fabricctl diff`, restore's
//! refusal to write over existing entries and its `--overwrite`,
//! `--skip-existing` and `--dry-run`, and a listing whose reader goes away
//! early (`| head`).

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use fabric_integration_tests::{Fabric, fabricctl_command, fabricctl_with_closed_stdout, pki};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A small tree: two files, a directory with one, a symlink.
fn small_tree(root: &Path) {
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("keep.txt"), b"the same in both").unwrap();
    std::fs::write(root.join("edit.txt"), b"before").unwrap();
    std::fs::write(root.join("chmod.txt"), b"mode changes").unwrap();
    std::fs::write(root.join("docs/readme.md"), b"# docs\n").unwrap();
    std::os::unix::fs::symlink("keep.txt", root.join("link")).unwrap();
}

/// Back up `source` with a push job `site` to n1; the snapshot's id.
fn back_up(fabric: &Fabric, source: &Path) -> String {
    let jobs = format!(
        "[job.site]\ndirection = \"push\"\nclient = \"client\"\ninclude = [\"{}\"]\ndest = \"n1\"\ninterval = \"24h\"\n",
        source.display()
    );
    let runs = fabric.submit(&jobs, &["site"]);
    let run = fabric.wait_run(&runs[0]);
    assert_eq!(run["state"], "done", "{run}");
    let found = fabric.json(&["find", "-r", "0", "--job", "site"]);
    found[0]["id"].as_str().unwrap().to_owned()
}

/// `source`'s path inside its snapshot.
fn inside(source: &Path) -> String {
    source.to_str().unwrap().trim_start_matches('/').to_owned()
}

#[test]
fn ls_and_diff_show_snapshots_without_restoring_them() {
    let fabric = Fabric::start(1);
    let source = fabric.dir.path().join("source");
    small_tree(&source);
    let first = back_up(&fabric, &source);
    std::fs::write(source.join("edit.txt"), b"after, and longer").unwrap();
    std::fs::remove_file(source.join("docs/readme.md")).unwrap();
    std::fs::write(source.join("added.bin"), vec![7u8; 1000]).unwrap();
    std::fs::set_permissions(
        source.join("chmod.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let second = back_up(&fabric, &source);
    assert_ne!(first, second);
    let path = inside(&source);

    // ls: one directory, objects in JSON.
    let listed = fabric.json(&["ls", &first[..8], &path]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["path"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["chmod.txt", "docs", "edit.txt", "keep.txt", "link"]);
    let edit = &listed[2];
    assert_eq!(edit["kind"], "file");
    assert_eq!(edit["size"], 6);
    assert_eq!(edit["mode"], "0644");
    assert_eq!(listed[4]["target"], "keep.txt");
    // -r goes into directories; the table shows mode, owner, size, mtime, name.
    let table = fabric.ctl(&["ls", "latest", "--job", "site", &path, "-r"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(
        text.contains("MODE") && text.contains("OWNER") && text.contains("MTIME"),
        "{text}"
    );
    assert!(
        text.contains("-rw-------") && text.contains("added.bin"),
        "{text}"
    );
    assert!(text.contains("link -> keep.txt"), "{text}");
    // One file, by its path.
    let one = fabric.json(&["ls", "0", &format!("{path}/edit.txt")]);
    assert_eq!(one[0]["size"], 17);
    let missing = fabric.ctl(&["ls", "0", "no/such/path"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("\"no/such/path\""),
        "{}",
        stderr(&missing)
    );

    // diff: each kind of change, and the summary.
    let diff = fabric.json(&["diff", &first, &second, &path]);
    let changes: Vec<(String, String)> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["change"].as_str().unwrap().to_owned(),
                row["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let has = |change: &str, path: &str| changes.iter().any(|(c, p)| c == change && p == path);
    assert!(has("added", "added.bin"), "{changes:?}");
    assert!(has("removed", "docs/readme.md"), "{changes:?}");
    assert!(has("modified", "edit.txt"), "{changes:?}");
    assert!(has("metadata", "chmod.txt"), "{changes:?}");
    assert!(
        !changes.iter().any(|(_, p)| p == "keep.txt" || p == "link"),
        "{changes:?}"
    );
    assert_eq!(diff["summary"]["added"], 1);
    assert_eq!(diff["summary"]["added_bytes"], 1000);
    assert_eq!(diff["summary"]["removed"], 1);
    assert_eq!(diff["summary"]["modified_bytes_before"], 6);
    assert_eq!(diff["summary"]["modified_bytes_after"], 17);
    let table = fabric.ctl(&["diff", "1", "0", "--job", "site"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(
        text.lines()
            .any(|line| line.trim_start().starts_with("+ ") && line.contains("added.bin")),
        "{text}"
    );
    assert!(
        text.contains("1 added (1000 B), 1 removed (7 B), 1 modified (6 B -> 17 B)"),
        "{text}"
    );
    // A snapshot against itself: nothing.
    let same = fabric.json(&["diff", &first, &first]);
    assert!(same["changes"].as_array().unwrap().is_empty());

    // Whoever may restore may browse: a client its own host's snapshots;
    // a monitor, who may not restore, may not read trees either.
    let certs = fabric.dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    for (role, name, allowed) in [
        (fabric_trust::Role::Client, "client-host", true),
        (fabric_trust::Role::Monitor, "dashboard", false),
    ] {
        let flags = pki().flags(role, name, &certs);
        let mut args: Vec<&str> = vec!["--coordinator", &fabric.coordinator.address];
        args.extend(flags.iter().map(String::as_str));
        args.extend(["ls", &first[..8], &path]);
        let output = fabricctl_command(&args).output().unwrap();
        assert_eq!(
            output.status.success(),
            allowed,
            "{role:?}: {}",
            stderr(&output)
        );
        if !allowed {
            assert!(
                stderr(&output).contains("GetTree") || stderr(&output).contains("GetSnapshot"),
                "{}",
                stderr(&output)
            );
        }
    }

    // A listing whose reader goes away early ends quietly.
    let output = fabricctl_with_closed_stdout(&[
        "--coordinator",
        fabric.coordinator.address.as_str(),
        "ls",
        "0",
        "-r",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
}

#[test]
fn a_restore_refuses_to_write_over_existing_entries_unless_told_how() {
    let fabric = Fabric::start(1);
    let source = fabric.dir.path().join("source");
    small_tree(&source);
    let id = back_up(&fabric, &source);
    let path = inside(&source);
    let target = fabric.dir.path().join("target");
    let to = target.to_str().unwrap();

    // Into a new directory: written as before.
    fabric.restore_matching(&id, &source, "target", &[]);

    // Again: refused, naming the directory, the first entry in the way and the flags.
    std::fs::write(target.join("edit.txt"), b"edited here").unwrap();
    std::fs::remove_file(target.join("docs/readme.md")).unwrap();
    let refused = fabric.ctl(&["restore", &id, &path, "--to", to]);
    assert!(!refused.status.success());
    let text = stderr(&refused);
    assert!(
        text.contains(&format!(
            "refusing to restore into {to}: chmod.txt is already there"
        )),
        "{text}"
    );
    assert!(
        text.contains("--overwrite") && text.contains("--skip-existing"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(target.join("edit.txt")).unwrap(),
        b"edited here"
    );
    assert!(
        !target.join("docs/readme.md").exists(),
        "nothing was written"
    );

    // A dry run lists what would happen, and writes nothing.
    let plan = fabric.json(&[
        "restore",
        &id,
        &path,
        "--to",
        to,
        "--skip-existing",
        "--dry-run",
    ]);
    let action_of = |plan: &serde_json::Value, path: &str| {
        plan.as_array()
            .unwrap()
            .iter()
            .find(|row| row["path"] == path)
            .map(|row| row["action"].as_str().unwrap().to_owned())
    };
    assert_eq!(action_of(&plan, "edit.txt").as_deref(), Some("keep"));
    assert_eq!(action_of(&plan, "docs/readme.md").as_deref(), Some("write"));
    let readme = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["path"] == "docs/readme.md")
        .unwrap();
    assert_eq!(readme["kind"], "file");
    assert_eq!(readme["size"], 7);
    let conflicts = fabric.ctl(&["restore", &id, &path, "--to", to, "--dry-run"]);
    assert!(conflicts.status.success(), "{}", stderr(&conflicts));
    assert!(
        stdout(&conflicts).contains("conflict"),
        "{}",
        stdout(&conflicts)
    );
    assert!(
        !target.join("docs/readme.md").exists(),
        "a dry run writes nothing"
    );

    // --skip-existing: only what is missing comes back.
    let skipped = fabric.ctl(&["restore", &id, &path, "--to", to, "--skip-existing"]);
    assert!(skipped.status.success(), "{}", stderr(&skipped));
    assert!(
        stderr(&skipped).contains("skipped 4 entries already in"),
        "{}",
        stderr(&skipped)
    );
    assert_eq!(
        std::fs::read(target.join("edit.txt")).unwrap(),
        b"edited here"
    );
    assert_eq!(
        std::fs::read(target.join("docs/readme.md")).unwrap(),
        b"# docs\n"
    );

    // --overwrite: the snapshot's version everywhere.
    fabric.restore_matching(&id, &source, "target", &["--overwrite"]);
    let both = fabric.ctl(&["restore", &id, "--to", to, "--overwrite", "--skip-existing"]);
    assert!(!both.status.success());
    let tar = fabric.ctl(&["restore", &id, "--to", "-", "--overwrite"]);
    assert!(!tar.status.success());
    assert!(
        stderr(&tar).contains("not to a tar stream"),
        "{}",
        stderr(&tar)
    );
}
