//! Restore tests: path safety on hand-made hostile trees, subtree and
//! single-file restores, chunk checks, the tar stream, and the restore
//! policy (owners, setuid and setgid bits, special files).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fabric_proto::v1::{EntryKind, ExtendedAttribute, Tree, TreeEntry};

use super::*;
use crate::chunker::Chunk;
use crate::sink::ChunkSink;
use crate::walk::memory::MemoryStore;
use crate::walk::tests::{
    describe, entry_at, options, pseudo_random, quiet, restore_into, set_mtime,
};
use crate::walk::{ParentSnapshot, backup};

fn file_entry(store: &MemoryStore, name: &[u8], content: &[u8]) -> TreeEntry {
    let mut chunk_ids = Vec::new();
    if !content.is_empty() {
        let chunk = Chunk::new(content.to_vec());
        chunk_ids.push(chunk.id.to_vec());
        store.put_chunk(chunk).expect("put");
    }
    TreeEntry {
        name: name.to_vec(),
        kind: EntryKind::File as i32,
        mode: 0o100644,
        size: content.len() as u64,
        mtime_ns: 1_600_000_000_000_000_000,
        chunk_ids,
        ..TreeEntry::default()
    }
}

fn dir_entry(name: &[u8], subtree: ChunkId) -> TreeEntry {
    TreeEntry {
        name: name.to_vec(),
        kind: EntryKind::Dir as i32,
        mode: 0o40755,
        mtime_ns: 1_600_000_000_000_000_000,
        subtree_id: subtree.to_vec(),
        ..TreeEntry::default()
    }
}

/// Every path under `dir`, relative.
fn listing(dir: &Path) -> Vec<String> {
    describe(dir)
        .into_keys()
        .map(|path| String::from_utf8_lossy(&path).into_owned())
        .collect()
}

#[test]
fn pax_records_count_their_own_length() {
    assert_eq!(pax_record("mtime", "1.5"), b"13 mtime=1.5\n");
    let long = pax_record("mtime", &"9".repeat(90));
    assert_eq!(long.len(), 101);
    assert!(long.starts_with(b"101 mtime="));
    // 8 bytes after the length: 9 in all. 9 bytes after it: 10 would need
    // two digits, so 11.
    assert_eq!(pax_record("k", "vvvv"), b"9 k=vvvv\n");
    assert_eq!(pax_record("k", "vvvvv"), b"11 k=vvvvv\n");
}

#[test]
fn entry_names_are_checked() {
    for good in [&b"a"[..], b"...", b".a", "ü".as_bytes(), b"\xff"] {
        check_entry_name(good).expect("good name");
    }
    for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
        assert!(
            matches!(check_entry_name(bad), Err(RestoreError::BadName { .. })),
            "{bad:?}"
        );
    }
    for good in [&b"a"[..], b"a/b/c", "ü/...".as_bytes()] {
        check_relative_path(good).expect("good path");
    }
    for bad in [
        &b""[..],
        b"/etc/x",
        b"../x",
        b"a/../b",
        b"a//b",
        b"a/./b",
        b"a/",
        b"a/b\0",
    ] {
        let err = check_relative_path(bad).expect_err("bad path");
        assert!(
            err.to_string()
                .contains(&format!("{:?}", String::from_utf8_lossy(bad))),
            "{err} names {bad:?}"
        );
    }
}

/// A tree with a good file and then `bad` (as a file or, when `as_dir`, as
/// a directory holding a file), nested below `d` when `nested`.
fn hostile_root(store: &MemoryStore, bad: &[u8], as_dir: bool, nested: bool) -> ChunkId {
    let bad_entry = if as_dir {
        let inner = store.put_tree(&Tree {
            entries: vec![file_entry(store, b"payload", b"escaped!")],
            parts: Vec::new(),
        });
        dir_entry(bad, inner)
    } else {
        file_entry(store, bad, b"escaped!")
    };
    // Sorted by name: "!good" sorts before every bad name used here
    // except the empty one.
    let mut entries = vec![file_entry(store, b"!good", b"fine"), bad_entry];
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let tree = store.put_tree(&Tree {
        entries,
        parts: Vec::new(),
    });
    if nested {
        store.put_tree(&Tree {
            entries: vec![dir_entry(b"d", tree)],
            parts: Vec::new(),
        })
    } else {
        tree
    }
}

#[test]
fn hostile_names_are_refused_and_nothing_escapes() {
    for bad in [&b".."[..], b".", b"a/b", b"../x", b"/etc/x", b"", b"x\0y"] {
        for as_dir in [false, true] {
            for nested in [false, true] {
                let store = MemoryStore::default();
                let root = hostile_root(&store, bad, as_dir, nested);
                let temp = tempfile::tempdir().expect("tempdir");
                let target = temp.path().join("target");
                let mut directory =
                    DirectoryTarget::new(&target, RestorePolicy::default()).expect("target");
                let err = restore(&store, root, "", &mut directory).expect_err("refused");
                let RestoreError::BadName { path, .. } = &err else {
                    panic!("{bad:?}: {err}");
                };
                let expected = if nested {
                    format!("d/{}", String::from_utf8_lossy(bad))
                } else {
                    String::from_utf8_lossy(bad).into_owned()
                };
                assert_eq!(path, &expected, "{err}");
                assert_eq!(listing(temp.path()), {
                    let mut expected = vec!["target".to_owned()];
                    let prefix = if nested {
                        expected.push("target/d".to_owned());
                        "target/d/"
                    } else {
                        "target/"
                    };
                    if !bad.is_empty() {
                        expected.push(format!("{prefix}!good"));
                    }
                    expected.sort();
                    expected
                });
                assert!(!Path::new("/etc/x").exists());

                // The tar target refuses the same entries.
                let mut tar = TarTarget::new(Vec::new());
                assert!(matches!(
                    restore(&store, root, "", &mut tar),
                    Err(RestoreError::BadName { .. })
                ));
            }
        }
    }
}

#[test]
fn targets_check_paths_they_are_given() {
    let temp = tempfile::tempdir().expect("tempdir");
    let target = temp.path().join("target");
    let mut directory = DirectoryTarget::new(&target, RestorePolicy::default()).expect("target");
    let entry = TreeEntry {
        kind: EntryKind::File as i32,
        ..TreeEntry::default()
    };
    for bad in [&b"../x"[..], b"/tmp/x", b"a/../../x", b""] {
        assert!(directory.file_start(bad, &entry).is_err());
        assert!(directory.directory(bad, &entry).is_err());
        assert!(directory.symlink(bad, &entry).is_err());
        let mut tar = TarTarget::new(Vec::new());
        assert!(tar.file_start(bad, &entry).is_err());
    }
    assert!(matches!(
        directory.file_data(b"x"),
        Err(RestoreError::OutOfOrder(_))
    ));
    directory.finish().expect("finish");
    assert_eq!(listing(temp.path()), ["target"]);
}

#[test]
fn a_directory_target_can_be_driven_like_a_stream() {
    let temp = tempfile::tempdir().expect("tempdir");
    let target = temp.path().join("target");
    let mut directory = DirectoryTarget::new(&target, RestorePolicy::default()).expect("target");
    let entry = TreeEntry {
        kind: EntryKind::File as i32,
        mode: 0o100600,
        size: 6,
        mtime_ns: 1_000_000_000_123,
        ..TreeEntry::default()
    };
    // No directory() for x and x/y: they are created on the way.
    directory.file_start(b"x/y/z", &entry).expect("start");
    assert!(matches!(
        directory.file_start(b"x/other", &entry),
        Err(RestoreError::OutOfOrder(_))
    ));
    directory.file_data(b"abc").expect("data");
    directory.file_data(b"def").expect("data");
    directory.file_end().expect("end");
    // A file whose data falls short of its size is an error naming it.
    directory.file_start(b"x/short", &entry).expect("start");
    directory.file_data(b"abc").expect("data");
    let err = directory.file_end().expect_err("short");
    assert!(err.to_string().contains("x/short"), "{err}");
    directory.finish().expect("finish");
    assert_eq!(fs::read(target.join("x/y/z")).expect("read"), b"abcdef");
    let meta = fs::metadata(target.join("x/y/z")).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        meta.modified().expect("mtime"),
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(1_000_000_000_123)
    );
}

#[test]
fn an_aborted_directory_restore_removes_what_it_wrote_and_nothing_else() {
    let temp = tempfile::tempdir().expect("tempdir");
    let target = temp.path().join("target");
    fs::create_dir_all(target.join("kept")).expect("mkdir");
    fs::write(target.join("kept/before"), b"mine").expect("write");
    let mut directory = DirectoryTarget::new(&target, RestorePolicy::default()).expect("target");
    let entry = TreeEntry {
        kind: EntryKind::File as i32,
        mode: 0o100644,
        size: 6,
        ..TreeEntry::default()
    };
    directory.file_start(b"kept/new", &entry).expect("start");
    directory.file_data(b"abcdef").expect("data");
    directory.file_end().expect("end");
    directory.file_start(b"a/b/c", &entry).expect("start");
    directory.file_data(b"abcdef").expect("data");
    directory.file_end().expect("end");
    directory
        .hard_link(b"a/link", b"a/b/c", &entry)
        .expect("link");
    let link = TreeEntry {
        kind: EntryKind::Symlink as i32,
        symlink_target: b"b/c".to_vec(),
        ..TreeEntry::default()
    };
    directory.symlink(b"a/sym", &link).expect("symlink");
    // Half a file, then the restore fails.
    directory.file_start(b"a/half", &entry).expect("start");
    directory.file_data(b"abc").expect("data");
    assert!(directory.restartable());
    let removed = directory.abort().expect("abort");
    // kept/new, a, a/b, a/b/c, a/link, a/sym, a/half.
    assert_eq!(removed, 7);
    assert_eq!(listing(&target), vec!["kept", "kept/before"]);
    assert_eq!(fs::read(target.join("kept/before")).expect("read"), b"mine");
}

/// A file entry of `size` bytes, to drive a target by hand.
fn sized_file(size: u64) -> TreeEntry {
    TreeEntry {
        kind: EntryKind::File as i32,
        mode: 0o100644,
        size,
        ..TreeEntry::default()
    }
}

#[test]
fn refusing_existing_entries_stops_at_the_first_and_changes_nothing_there() {
    let temp = tempfile::tempdir().expect("tempdir");
    let target = temp.path().join("refused");
    fs::create_dir_all(&target).expect("mkdir");
    fs::write(target.join("readme.md"), b"mine").expect("write");
    let mut directory = DirectoryTarget::new(&target, RestorePolicy::default())
        .expect("target")
        .with_existing(ExistingEntries::Refuse);
    directory.file_start(b"new", &sized_file(3)).expect("start");
    directory.file_data(b"abc").expect("data");
    directory.file_end().expect("end");
    let err = directory
        .file_start(b"readme.md", &sized_file(6))
        .expect_err("refused");
    assert!(
        matches!(&err, RestoreError::Exists { path } if path == &target.join("readme.md")),
        "{err}"
    );
    // What the restore wrote before goes; what was there stays.
    assert_eq!(directory.abort().expect("abort"), 1);
    assert_eq!(listing(&target), ["readme.md"]);
    assert_eq!(fs::read(target.join("readme.md")).expect("read"), b"mine");

    // An existing directory is a conflict too: it would get new metadata.
    let (temp, source, store, root) = backed_up_tree();
    let docs = format!("{}/docs", source.to_str().expect("utf-8"));
    let target = temp.path().join("refused-dir");
    fs::create_dir_all(target.join("deeper")).expect("mkdir");
    let mut directory = DirectoryTarget::new(&target, RestorePolicy::default())
        .expect("target")
        .with_existing(ExistingEntries::Refuse);
    let err = restore(&store, root, &docs, &mut directory).expect_err("refused");
    assert!(
        matches!(&err, RestoreError::Exists { path } if path == &target.join("deeper")),
        "{err}"
    );
    assert_eq!(listing(&target), ["deeper"]);
}

#[test]
fn skipping_existing_entries_restores_only_what_is_missing() {
    let (temp, source, store, root) = backed_up_tree();
    let docs = format!("{}/docs", source.to_str().expect("utf-8"));
    let target = temp.path().join("skipped");
    fs::create_dir_all(target.join("deeper")).expect("mkdir");
    fs::set_permissions(target.join("deeper"), fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::write(target.join("readme.md"), b"mine").expect("write");
    fs::write(target.join("deeper/big.bin"), b"mine too").expect("write");
    let mut directory = DirectoryTarget::new(&target, RestorePolicy::default())
        .expect("target")
        .with_existing(ExistingEntries::Skip);
    let stats = restore(&store, root, &docs, &mut directory).expect("restore");
    assert_eq!(stats.existing_kept, 2);
    assert_eq!(fs::read(target.join("readme.md")).expect("read"), b"mine");
    assert_eq!(
        fs::read(target.join("deeper/big.bin")).expect("read"),
        b"mine too"
    );
    // The directory that was there keeps its own mode.
    assert_eq!(mode_of(&target.join("deeper")), 0o700);
    // What was missing is restored.
    assert_eq!(
        fs::read(target.join("deeper").join("n".repeat(150))).expect("read"),
        b"long name"
    );
    assert!(target.join("empty-file").exists());
}

#[test]
fn an_aborted_restore_never_removes_an_entry_it_left_as_it_was() {
    let temp = tempfile::tempdir().expect("tempdir");
    let target = temp.path().join("target");
    fs::create_dir_all(target.join("dir")).expect("mkdir");
    fs::write(target.join("dir/before"), b"mine").expect("write");
    let mut directory = DirectoryTarget::new(&target, RestorePolicy::default())
        .expect("target")
        .with_existing(ExistingEntries::Skip);
    let dir = TreeEntry {
        kind: EntryKind::Dir as i32,
        mode: 0o40755,
        ..TreeEntry::default()
    };
    directory.directory(b"dir", &dir).expect("dir");
    directory
        .file_start(b"dir/before", &sized_file(6))
        .expect("start");
    directory.file_data(b"theirs").expect("data");
    directory.file_end().expect("end");
    // A later link to the file left as it was is not made to it.
    let mut linked = sized_file(6);
    linked.links = 2;
    directory
        .hard_link(b"dir/link", b"dir/before", &linked)
        .expect("link");
    directory
        .file_start(b"dir/new", &sized_file(3))
        .expect("start");
    directory.file_data(b"abc").expect("data");
    directory.file_end().expect("end");
    let removed = directory.abort().expect("abort");
    assert_eq!(removed, 1, "only dir/new was written");
    assert_eq!(listing(&target), ["dir", "dir/before"]);
    assert_eq!(fs::read(target.join("dir/before")).expect("read"), b"mine");
}

#[test]
fn a_symlink_already_in_the_target_is_never_followed() {
    let temp = tempfile::tempdir().expect("tempdir");
    let outside = temp.path().join("outside");
    fs::create_dir(&outside).expect("mkdir");
    fs::write(outside.join("f"), b"original").expect("write");
    let target = temp.path().join("target");
    fs::create_dir(&target).expect("mkdir");
    // A directory of the snapshot is a symlink out of the target...
    std::os::unix::fs::symlink(&outside, target.join("d")).expect("symlink");
    // ...and a file of the snapshot is a symlink to a file outside.
    std::os::unix::fs::symlink(outside.join("f"), target.join("g")).expect("symlink");

    let store = MemoryStore::default();
    let inner = store.put_tree(&Tree {
        entries: vec![file_entry(&store, b"f", b"overwritten!")],
        parts: Vec::new(),
    });
    let with_file = store.put_tree(&Tree {
        entries: vec![file_entry(&store, b"g", b"new g")],
        parts: Vec::new(),
    });
    let err = restore(
        &store,
        with_file,
        "",
        &mut DirectoryTarget::new(&target, RestorePolicy::default()).expect("target"),
    );
    err.expect("the symlink at g is replaced, not followed");
    assert_eq!(fs::read(outside.join("f")).expect("read"), b"original");
    assert_eq!(fs::read(target.join("g")).expect("read"), b"new g");
    assert!(
        !fs::symlink_metadata(target.join("g"))
            .expect("lstat")
            .file_type()
            .is_symlink()
    );

    let with_dir = store.put_tree(&Tree {
        entries: vec![dir_entry(b"d", inner)],
        parts: Vec::new(),
    });
    let err = restore(
        &store,
        with_dir,
        "",
        &mut DirectoryTarget::new(&target, RestorePolicy::default()).expect("target"),
    )
    .expect_err("d is a symlink");
    assert!(matches!(err, RestoreError::Unsafe { .. }), "{err}");
    assert!(err.to_string().contains("target/d"), "{err}");
    assert_eq!(fs::read(outside.join("f")).expect("read"), b"original");
    assert_eq!(listing(&outside), ["f"]);
}

#[test]
fn a_chunk_that_does_not_match_its_id_is_not_written() {
    let store = MemoryStore::default();
    let good = Chunk::new(b"the real bytes".to_vec());
    store.insert_raw(good.id, b"evil bytes!!!!".to_vec());
    let root = store.put_tree(&Tree {
        entries: vec![TreeEntry {
            name: b"f".to_vec(),
            kind: EntryKind::File as i32,
            mode: 0o100644,
            size: 14,
            chunk_ids: vec![good.id.to_vec()],
            ..TreeEntry::default()
        }],
        parts: Vec::new(),
    });
    let temp = tempfile::tempdir().expect("tempdir");
    let target = temp.path().join("target");
    let err = restore(
        &store,
        root,
        "",
        &mut DirectoryTarget::new(&target, RestorePolicy::default()).expect("target"),
    )
    .expect_err("mismatch");
    assert!(
        matches!(&err, RestoreError::ChunkMismatch { id, path } if *id == good.id && path == "f"),
        "{err}"
    );
    assert_eq!(fs::read(target.join("f")).expect("created empty"), b"");

    let mut tar = TarTarget::new(Vec::new());
    assert!(restore(&store, root, "", &mut tar).is_err());
}

#[test]
fn unsorted_or_repeated_names_and_unknown_paths_are_refused() {
    let store = MemoryStore::default();
    let root = store.put_tree(&Tree {
        entries: vec![
            file_entry(&store, b"b", b"1"),
            file_entry(&store, b"a", b"2"),
        ],
        parts: Vec::new(),
    });
    let err = restore(&store, root, "", &mut TarTarget::new(Vec::new())).expect_err("unsorted");
    assert!(err.to_string().contains("\"a\""), "{err}");
    let root = store.put_tree(&Tree {
        entries: vec![
            file_entry(&store, b"a", b"1"),
            file_entry(&store, b"a", b"2"),
        ],
        parts: Vec::new(),
    });
    assert!(restore(&store, root, "", &mut TarTarget::new(Vec::new())).is_err());
    let err = restore(
        &store,
        root,
        "/no/such/path",
        &mut TarTarget::new(Vec::new()),
    )
    .expect_err("unknown");
    assert!(matches!(&err, RestoreError::NotFound { path } if path == "/no/such/path"));
    let err = restore(
        &store,
        root,
        "a/below-a-file",
        &mut TarTarget::new(Vec::new()),
    )
    .expect_err("unknown");
    assert!(matches!(err, RestoreError::NotFound { .. }));
    // A requested path cannot go through a hostile name either.
    let inner = store.put_tree(&Tree {
        entries: vec![file_entry(&store, b"f", b"x")],
        parts: Vec::new(),
    });
    let root_with_dots = store.put_tree(&Tree {
        entries: vec![dir_entry(b"..", inner)],
        parts: Vec::new(),
    });
    let err = restore(
        &store,
        root_with_dots,
        "../f",
        &mut TarTarget::new(Vec::new()),
    )
    .expect_err("dots");
    assert!(
        matches!(&err, RestoreError::BadName { path, .. } if path == ".."),
        "{err}"
    );
    // A file whose chunks do not add up to its size.
    let mut short = file_entry(&store, b"short", b"12345");
    short.size = 9;
    let root = store.put_tree(&Tree {
        entries: vec![short],
        parts: Vec::new(),
    });
    let err = restore(&store, root, "", &mut TarTarget::new(Vec::new())).expect_err("short");
    assert!(err.to_string().contains("short"), "{err}");
}

/// A small real tree, backed up: (temp dir, source path, store, root).
fn backed_up_tree() -> (tempfile::TempDir, std::path::PathBuf, MemoryStore, ChunkId) {
    let temp = tempfile::tempdir().expect("tempdir");
    let source = temp.path().join("source");
    fs::create_dir_all(source.join("docs/deeper")).expect("mkdir");
    fs::create_dir_all(source.join("empty")).expect("mkdir");
    fs::write(source.join("docs/readme.md"), b"# hello\n").expect("write");
    fs::write(source.join("docs/deeper/big.bin"), pseudo_random(50_000, 5)).expect("write");
    fs::write(source.join("docs/empty-file"), b"").expect("write");
    let long_name = "n".repeat(150);
    fs::write(source.join("docs/deeper").join(&long_name), b"long name").expect("write");
    fs::write(source.join("top.txt"), b"top").expect("write");
    fs::set_permissions(source.join("top.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
    std::os::unix::fs::symlink("docs/readme.md", source.join("link")).expect("symlink");
    // A read-only directory must still be filled, and get its mode after.
    fs::set_permissions(
        source.join("docs/deeper"),
        fs::Permissions::from_mode(0o555),
    )
    .expect("chmod");
    set_mtime(&source.join("docs"), 1_500_000_000, 77);
    let store = MemoryStore::default();
    let outcome = backup(&options(&[&source]), &store, None, &quiet).expect("backup");
    (temp, source, store, outcome.root)
}

#[test]
fn whole_subtree_and_single_file_restores() {
    let (temp, source, store, root) = backed_up_tree();
    let source_str = source.to_str().expect("utf-8");

    // Whole snapshot: the absolute path is mirrored under the target.
    let whole = temp.path().join("whole");
    restore(
        &store,
        root,
        "/",
        &mut DirectoryTarget::new(&whole, RestorePolicy::default()).expect("target"),
    )
    .expect("restore");
    let mirrored = whole.join(source.strip_prefix("/").expect("absolute"));
    assert_eq!(describe(&source), describe(&mirrored));

    // A subtree: its contents go into the target root.
    let sub = temp.path().join("sub");
    let stats = restore(
        &store,
        root,
        &format!("{source_str}/docs/"),
        &mut DirectoryTarget::new(&sub, RestorePolicy::default()).expect("target"),
    )
    .expect("restore");
    assert_eq!(stats.files, 4);
    assert_eq!(stats.dirs, 1);
    assert_eq!(describe(&source.join("docs")), describe(&sub));

    // One file: restored under its own name.
    let one = temp.path().join("one");
    let stats = restore(
        &store,
        root,
        &format!("{source_str}/docs/deeper/big.bin"),
        &mut DirectoryTarget::new(&one, RestorePolicy::default()).expect("target"),
    )
    .expect("restore");
    assert_eq!(stats.bytes, 50_000);
    assert_eq!(listing(&one), ["big.bin"]);
    assert_eq!(
        fs::read(one.join("big.bin")).expect("read"),
        pseudo_random(50_000, 5)
    );

    // Restoring again over an existing restore replaces what is there.
    fs::write(sub.join("readme.md"), b"locally edited").expect("edit");
    restore(
        &store,
        root,
        &format!("{source_str}/docs"),
        &mut DirectoryTarget::new(&sub, RestorePolicy::default()).expect("target"),
    )
    .expect("restore over");
    assert_eq!(describe(&source.join("docs")), describe(&sub));

    for dir in [source.join("docs"), mirrored.join("docs"), sub] {
        fs::set_permissions(dir.join("deeper"), fs::Permissions::from_mode(0o755))
            .expect("chmod back for cleanup");
    }
}

#[test]
fn tar_stream_parses_back_with_the_same_contents() {
    let (_temp, source, store, root) = backed_up_tree();
    let mut tar = TarTarget::new(Vec::new());
    let stats = restore(&store, root, source.to_str().expect("utf-8"), &mut tar).expect("tar");
    let bytes = tar.into_inner().expect("bytes");
    assert_eq!(bytes.len() % 512, 0);

    let mut seen = BTreeMap::new();
    let mut archive = tar::Archive::new(bytes.as_slice());
    for item in archive.entries().expect("entries") {
        let mut item = item.expect("entry");
        let path = item.path().expect("path").as_os_str().as_bytes().to_vec();
        let header = item.header().clone();
        let link = item
            .link_name()
            .expect("link")
            .map(|link| link.as_os_str().as_bytes().to_vec());
        let exact_mtime = item.pax_extensions().expect("pax").and_then(|records| {
            records
                .filter_map(Result::ok)
                .find(|record| record.key() == Ok("mtime"))
                .map(|record| record.value().expect("utf-8").to_owned())
        });
        let mut content = Vec::new();
        item.read_to_end(&mut content).expect("content");
        seen.insert(
            String::from_utf8_lossy(&path)
                .trim_end_matches('/')
                .to_owned(),
            (header, link, content, exact_mtime),
        );
    }
    let expected = describe(&source);
    assert_eq!(seen.len(), expected.len());
    assert_eq!(
        stats.files + stats.dirs + stats.symlinks,
        expected.len() as u64
    );
    for (path, described) in &expected {
        let key = String::from_utf8_lossy(path).into_owned();
        let (header, link, content, exact_mtime) = &seen[&key];
        match described {
            crate::walk::tests::Described::File {
                mode,
                mtime_ns,
                content: expected_content,
                ..
            } => {
                assert_eq!(header.entry_type(), tar::EntryType::Regular, "{key}");
                assert_eq!(content, expected_content, "{key}");
                assert_eq!(header.mode().expect("mode"), *mode, "{key}");
                assert_eq!(
                    header.mtime().expect("mtime") as i64,
                    mtime_ns / 1_000_000_000
                );
                let nanos = mtime_ns % 1_000_000_000;
                let expected_exact =
                    (nanos != 0).then(|| format!("{}.{nanos:09}", mtime_ns / 1_000_000_000));
                assert_eq!(exact_mtime, &expected_exact, "{key}");
            }
            crate::walk::tests::Described::Dir { mode, mtime_ns, .. } => {
                assert_eq!(header.entry_type(), tar::EntryType::Directory, "{key}");
                assert_eq!(header.mode().expect("mode"), *mode, "{key}");
                assert_eq!(
                    header.mtime().expect("mtime") as i64,
                    mtime_ns / 1_000_000_000
                );
            }
            crate::walk::tests::Described::Symlink { target, .. } => {
                assert_eq!(header.entry_type(), tar::EntryType::Symlink, "{key}");
                assert_eq!(link.as_deref(), Some(target.as_slice()), "{key}");
            }
            crate::walk::tests::Described::Other => panic!("no other entries here"),
        }
    }
    assert!(
        seen.keys().any(|key| key.len() > 150),
        "the long name survived"
    );
    assert!(
        seen.values().any(|(.., exact)| exact.is_some()),
        "files written now have sub-second mtimes"
    );
    fs::set_permissions(
        source.join("docs/deeper"),
        fs::Permissions::from_mode(0o755),
    )
    .expect("chmod back for cleanup");
}

#[test]
fn walk_tree_visits_depth_first_and_a_parent_cache_survives_a_damaged_parent() {
    let (_temp, source, store, root) = backed_up_tree();
    let mut order = Vec::new();
    walk_tree(
        &store,
        root,
        source.to_str().expect("utf-8"),
        |path, _| -> Result<(), RestoreError> {
            order.push(String::from_utf8_lossy(path).into_owned());
            Ok(())
        },
    )
    .expect("walk");
    let long = format!("docs/deeper/{}", "n".repeat(150));
    assert_eq!(
        order,
        [
            "docs",
            "docs/deeper",
            "docs/deeper/big.bin",
            long.as_str(),
            "docs/empty-file",
            "docs/readme.md",
            "empty",
            "link",
            "top.txt"
        ]
    );

    // A parent whose trees cannot be read: the backup reads everything again.
    let empty = MemoryStore::default();
    let parent = ParentSnapshot {
        source: &empty,
        root,
    };
    let outcome = backup(&options(&[&source]), &store, Some(parent), &quiet).expect("backup");
    assert_eq!(
        entry_at(&store, outcome.root, &source).subtree_id,
        entry_at(&store, root, &source).subtree_id
    );
    assert_eq!(outcome.stats.files_unchanged, 0);
    assert_eq!(outcome.warnings.len(), 1, "{:?}", outcome.warnings);
    fs::set_permissions(
        source.join("docs/deeper"),
        fs::Permissions::from_mode(0o755),
    )
    .expect("chmod back for cleanup");
}

/// A tree where `a` and `sub/b` are one file with two links, `c` has the
/// same content but is a file of its own, and `lonely` has a second link
/// outside the backed-up tree.
fn hard_linked_tree() -> (tempfile::TempDir, std::path::PathBuf, MemoryStore, ChunkId) {
    let temp = tempfile::tempdir().expect("tempdir");
    let source = temp.path().join("source");
    fs::create_dir_all(source.join("sub")).expect("mkdir");
    let content = pseudo_random(3000, 7);
    fs::write(source.join("a"), &content).expect("write");
    fs::hard_link(source.join("a"), source.join("sub/b")).expect("link");
    fs::write(source.join("c"), &content).expect("write");
    fs::write(source.join("lonely"), b"one link inside").expect("write");
    fs::hard_link(source.join("lonely"), temp.path().join("outside")).expect("link");
    let store = MemoryStore::default();
    let outcome = backup(&options(&[&source]), &store, None, &quiet).expect("backup");
    (temp, source, store, outcome.root)
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(path).expect("stat").ino()
}

#[test]
fn hard_links_are_restored_as_links_to_one_file() {
    let (temp, source, store, root) = hard_linked_tree();
    let walked = entry_at(&store, root, &source.join("sub/b"));
    assert_eq!(walked.links, 2);
    let target = temp.path().join("target");
    let stats = restore_into(&store, root, &source, &target);
    assert_eq!(stats.files, 4);
    assert_eq!(stats.hard_links, 1);
    assert_eq!(inode(&target.join("a")), inode(&target.join("sub/b")));
    assert_ne!(inode(&target.join("a")), inode(&target.join("c")));
    assert_eq!(
        fs::read(target.join("sub/b")).expect("read"),
        fs::read(source.join("a")).expect("read")
    );
    assert_eq!(
        fs::read(target.join("lonely")).expect("read"),
        b"one link inside"
    );
    assert_eq!(describe(&source), describe(&target));

    // Restoring only the subdirectory: its file's other link is not there.
    let partial = temp.path().join("partial");
    let stats = restore(
        &store,
        root,
        &format!("{}/sub", source.display()),
        &mut DirectoryTarget::new(&partial, RestorePolicy::default()).expect("target"),
    )
    .expect("restore");
    assert_eq!((stats.files, stats.hard_links), (1, 0));
    assert_eq!(listing(&partial), vec!["b"]);
}

#[test]
fn hard_links_travel_in_a_tar_stream_as_link_entries() {
    let (temp, source, store, root) = hard_linked_tree();
    let mut tar = TarTarget::new(Vec::new());
    restore(&store, root, source.to_str().expect("utf-8"), &mut tar).expect("tar");
    let bytes = tar.into_inner().expect("bytes");
    let unpacked = temp.path().join("unpacked");
    tar::Archive::new(bytes.as_slice())
        .unpack(&unpacked)
        .expect("unpack");
    let mut archive = tar::Archive::new(bytes.as_slice());
    let links: Vec<(String, String)> = archive
        .entries()
        .expect("entries")
        .map(|item| item.expect("entry"))
        .filter(|item| item.header().entry_type() == tar::EntryType::Link)
        .map(|item| {
            (
                item.path().expect("path").display().to_string(),
                item.link_name()
                    .expect("link")
                    .expect("a link name")
                    .display()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(links, vec![("sub/b".to_owned(), "a".to_owned())]);
    assert_eq!(inode(&unpacked.join("a")), inode(&unpacked.join("sub/b")));
    assert_eq!(
        fs::read(unpacked.join("sub/b")).expect("read"),
        fs::read(source.join("a")).expect("read")
    );
}

#[test]
fn only_entries_of_one_inode_with_the_same_content_are_linked() {
    let entry = |name: &[u8], inode: u64, links: u64, chunk: &[u8]| TreeEntry {
        name: name.to_vec(),
        kind: EntryKind::File as i32,
        size: 10,
        inode,
        device: 1,
        links,
        chunk_ids: vec![chunk.to_vec()],
        ..TreeEntry::default()
    };
    let mut hard_links = HardLinks::default();
    assert_eq!(hard_links.link_target(b"a", &entry(b"a", 5, 2, b"x")), None);
    assert_eq!(
        hard_links.link_target(b"d/b", &entry(b"b", 5, 2, b"x")),
        Some(b"a".to_vec())
    );
    // Changed between the reads of its links: written as its own file.
    assert_eq!(hard_links.link_target(b"c", &entry(b"c", 5, 2, b"y")), None);
    // One link only, or another inode: never linked.
    assert_eq!(hard_links.link_target(b"e", &entry(b"e", 6, 1, b"x")), None);
    assert_eq!(hard_links.link_target(b"f", &entry(b"f", 6, 1, b"x")), None);
    let mut directory = entry(b"g", 5, 2, b"x");
    directory.kind = EntryKind::Dir as i32;
    assert_eq!(hard_links.link_target(b"g", &directory), None);
}

/// Back `content` up as the file `image` with chunks of `params`, restore
/// it, check it comes back the same, and, where the file system keeps
/// holes, that fewer than 1 MiB are allocated for it. Returns its entry.
fn restored_with_holes(content: &[u8], params: crate::ChunkParams) -> TreeEntry {
    use std::os::unix::fs::MetadataExt;
    let temp = tempfile::tempdir().expect("tempdir");
    let source = temp.path().join("source");
    fs::create_dir_all(&source).expect("mkdir");
    fs::write(source.join("image"), content).expect("write");
    let store = MemoryStore::default();
    let mut options = options(&[&source]);
    options.chunk_params = params;
    let outcome = backup(&options, &store, None, &quiet).expect("backup");

    let target = temp.path().join("target");
    restore_into(&store, outcome.root, &source, &target);
    let restored = target.join("image");
    assert!(fs::read(&restored).expect("read") == content);
    assert_eq!(describe(&source), describe(&target));
    let probe = temp.path().join("probe");
    fs::File::create(&probe)
        .and_then(|file| file.set_len(1 << 20))
        .expect("probe");
    if fs::metadata(&probe).expect("stat").blocks() == 0 {
        let allocated = fs::metadata(&restored).expect("stat").blocks() * 512;
        assert!(
            allocated < (1 << 20),
            "{allocated} bytes allocated for {} bytes, most of them zeros",
            content.len()
        );
    }
    entry_at(&store, outcome.root, &source.join("image"))
}

#[test]
fn zero_runs_are_restored_as_holes_with_the_same_content() {
    let mut content = pseudo_random(100_000, 1);
    content.extend(std::iter::repeat_n(0u8, 2 << 20));
    content.extend(pseudo_random(10_000, 2));
    content.extend(std::iter::repeat_n(0u8, 3 << 20));
    restored_with_holes(&content, crate::walk::tests::small_params());
}

#[test]
fn zeros_inside_a_chunk_with_data_are_restored_as_holes_too() {
    let mut content = pseudo_random(100_000, 1);
    content.extend(std::iter::repeat_n(0u8, 2 << 20));
    content.extend(pseudo_random(10_000, 2));
    content.extend(std::iter::repeat_n(0u8, 1 << 20));
    // With the default 512 KiB..4 MiB chunks, data and zeros share chunks.
    let entry = restored_with_holes(&content, crate::ChunkParams::default());
    assert!(entry.chunk_ids.len() <= 2, "data and zeros share chunks");
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> bool {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).is_ok()
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buffer = vec![0u8; 4096];
    let length = rustix::fs::lgetxattr(path, name, &mut buffer[..]).ok()?;
    buffer.truncate(length);
    Some(buffer)
}

#[test]
fn extended_attributes_are_recorded_reused_and_restored() {
    let temp = tempfile::tempdir().expect("tempdir");
    let source = temp.path().join("source");
    fs::create_dir_all(source.join("dir")).expect("mkdir");
    fs::write(source.join("dir/file"), b"content").expect("write");
    fs::write(source.join("plain"), b"no attributes").expect("write");
    if !set_xattr(
        &source.join("dir/file"),
        "user.fabric.note",
        b"\x00binary\xff",
    ) {
        eprintln!("user extended attributes unsupported here: nothing to test");
        return;
    }
    let big = vec![b'v'; 3000];
    assert!(set_xattr(&source.join("dir/file"), "user.fabric.big", &big));
    assert!(set_xattr(
        &source.join("dir"),
        "user.fabric.dir",
        b"on a directory"
    ));

    let store = MemoryStore::default();
    let first = backup(&options(&[&source]), &store, None, &quiet).expect("backup");
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    let file = entry_at(&store, first.root, &source.join("dir/file"));
    let names: Vec<&[u8]> = file.xattrs.iter().map(|a| a.name.as_slice()).collect();
    assert_eq!(names, vec![&b"user.fabric.big"[..], b"user.fabric.note"]);
    assert!(
        entry_at(&store, first.root, &source.join("plain"))
            .xattrs
            .is_empty()
    );

    // Unchanged: the parent's attributes are kept without reading the file.
    let parent = ParentSnapshot {
        source: &store,
        root: first.root,
    };
    let second = backup(&options(&[&source]), &store, Some(parent), &quiet).expect("backup");
    assert_eq!(second.stats.bytes_read, 0);
    assert_eq!(second.root, first.root);

    let target = temp.path().join("target");
    restore_into(&store, first.root, &source, &target);
    assert_eq!(
        get_xattr(&target.join("dir/file"), "user.fabric.note").as_deref(),
        Some(&b"\x00binary\xff"[..])
    );
    assert_eq!(
        get_xattr(&target.join("dir/file"), "user.fabric.big"),
        Some(big.clone())
    );
    assert_eq!(
        get_xattr(&target.join("dir"), "user.fabric.dir").as_deref(),
        Some(&b"on a directory"[..])
    );

    let mut tar = TarTarget::new(Vec::new());
    restore(
        &store,
        first.root,
        source.to_str().expect("utf-8"),
        &mut tar,
    )
    .expect("tar");
    let bytes = tar.into_inner().expect("bytes");
    let mut archive = tar::Archive::new(bytes.as_slice());
    let mut found = BTreeMap::new();
    for item in archive.entries().expect("entries") {
        let mut item = item.expect("entry");
        let path = item.path().expect("path").display().to_string();
        let path = path.trim_end_matches('/').to_owned();
        if let Some(records) = item.pax_extensions().expect("pax") {
            for record in records {
                let record = record.expect("record");
                if let Some(name) = record.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    found.insert(
                        (path.clone(), String::from_utf8_lossy(name).into_owned()),
                        record.value_bytes().to_vec(),
                    );
                }
            }
        }
    }
    assert_eq!(found.len(), 3, "{:?}", found.keys().collect::<Vec<_>>());
    assert_eq!(
        found[&("dir/file".to_owned(), "user.fabric.note".to_owned())],
        b"\x00binary\xff"
    );
    assert_eq!(
        found[&("dir/file".to_owned(), "user.fabric.big".to_owned())],
        big
    );
    assert_eq!(
        found[&("dir".to_owned(), "user.fabric.dir".to_owned())],
        b"on a directory"
    );
}

#[test]
fn extended_attributes_of_a_symlink_are_restored_on_the_symlink() {
    let temp = tempfile::tempdir().expect("tempdir");
    let source = temp.path().join("source");
    fs::create_dir_all(&source).expect("mkdir");
    fs::write(source.join("file"), b"content").expect("write");
    std::os::unix::fs::symlink("file", source.join("link")).expect("symlink");
    // Linux allows no user.* attribute on a symlink: trusted.* (root) is
    // the namespace a test can write on one.
    if !set_xattr(&source.join("link"), "trusted.fabric.link", b"on the link") {
        eprintln!("trusted extended attributes on symlinks unsupported here: nothing to test");
        return;
    }

    let store = MemoryStore::default();
    let outcome = backup(&options(&[&source]), &store, None, &quiet).expect("backup");
    let target = temp.path().join("target");
    restore_into(&store, outcome.root, &source, &target);
    assert_eq!(
        get_xattr(&target.join("link"), "trusted.fabric.link").as_deref(),
        Some(&b"on the link"[..])
    );
    assert_eq!(
        get_xattr(&target.join("file"), "trusted.fabric.link"),
        None,
        "set on the symlink, not on what it points to"
    );
    assert_eq!(
        fs::read_link(target.join("link")).expect("still a symlink"),
        Path::new("file")
    );
}

#[test]
fn extended_attributes_that_cannot_be_set_are_counted_and_the_rest_restored() {
    // No file system knows the namespace "fabric-test": every one of these
    // is refused, whoever restores.
    let refused = |name: &str| ExtendedAttribute {
        name: format!("fabric-test.{name}").into_bytes(),
        value: b"value".to_vec(),
    };
    let store = MemoryStore::default();
    let mut file = file_entry(&store, b"file", b"content");
    file.xattrs = vec![refused("one"), refused("two")];
    let inner = store.put_tree(&Tree {
        entries: vec![file_entry(&store, b"plain", b"plain")],
        parts: Vec::new(),
    });
    let mut dir = dir_entry(b"dir", inner);
    dir.xattrs = vec![refused("dir")];
    let link = TreeEntry {
        name: b"link".to_vec(),
        kind: EntryKind::Symlink as i32,
        mode: 0o120777,
        symlink_target: b"file".to_vec(),
        xattrs: vec![refused("link")],
        ..TreeEntry::default()
    };
    let root = store.put_tree(&Tree {
        entries: vec![dir, file, link],
        parts: Vec::new(),
    });

    let temp = tempfile::tempdir().expect("tempdir");
    let mut target = DirectoryTarget::new(temp.path(), RestorePolicy::default()).expect("target");
    let stats = restore(&store, root, "/", &mut target).expect("restore goes on");
    assert_eq!(stats.attributes_not_restored, 4);
    assert_eq!((stats.files, stats.dirs, stats.symlinks), (2, 1, 1));
    assert_eq!(
        fs::read(temp.path().join("file")).expect("file"),
        b"content"
    );
    assert_eq!(
        fs::read(temp.path().join("dir/plain")).expect("file"),
        b"plain"
    );

    // A tar stream carries them all: nothing to count.
    let mut tar = TarTarget::new(Vec::new());
    let stats = restore(&store, root, "/", &mut tar).expect("tar");
    assert_eq!(stats.attributes_not_restored, 0);
}

/// A snapshot as an untrusted uploader might record it: `tool`, setuid and
/// setgid (0o6755), and `link` inside `shared`, a setgid directory, and
/// `tmp`, a sticky directory, all four owned by uid and gid 12345; `fifo`
/// and `disk`, a FIFO and a block device.
fn privileged_root(store: &MemoryStore) -> ChunkId {
    let owned = |mut entry: TreeEntry| {
        entry.uid = 12345;
        entry.gid = 12345;
        entry
    };
    let mut tool = owned(file_entry(store, b"tool", b"#!/bin/sh\nid\n"));
    tool.mode = 0o106755;
    let link = owned(TreeEntry {
        name: b"link".to_vec(),
        kind: EntryKind::Symlink as i32,
        mode: 0o120777,
        symlink_target: b"tool".to_vec(),
        mtime_ns: 1_600_000_000_000_000_000,
        ..TreeEntry::default()
    });
    let inner = store.put_tree(&Tree {
        entries: vec![link, tool],
        parts: Vec::new(),
    });
    let mut shared = owned(dir_entry(b"shared", inner));
    shared.mode = 0o42775;
    let empty = store.put_tree(&Tree::default());
    let mut tmp = owned(dir_entry(b"tmp", empty));
    tmp.mode = 0o41777;
    let special = |name: &[u8], mode: u32| TreeEntry {
        name: name.to_vec(),
        kind: EntryKind::Other as i32,
        mode,
        mtime_ns: 1_600_000_000_000_000_000,
        ..TreeEntry::default()
    };
    store.put_tree(&Tree {
        entries: vec![
            special(b"disk", 0o060660),
            special(b"fifo", 0o010644),
            shared,
            tmp,
        ],
        parts: Vec::new(),
    })
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("lstat")
        .permissions()
        .mode()
        & 0o7777
}

fn owner_of(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path).expect("lstat");
    (meta.uid(), meta.gid())
}

/// Whether this process may give a file to uid and gid 12345 (root, in
/// most places; a user namespace may not map that id even for root).
fn may_give_files_away(dir: &Path) -> bool {
    let probe = dir.join("chown-probe");
    fs::write(&probe, b"").expect("probe");
    let allowed = std::os::unix::fs::chown(&probe, Some(12345), Some(12345)).is_ok();
    fs::remove_file(&probe).expect("remove probe");
    allowed
}

#[test]
fn setuid_and_setgid_bits_are_dropped_by_default_and_kept_on_request() {
    let store = MemoryStore::default();
    let root = privileged_root(&store);
    let temp = tempfile::tempdir().expect("tempdir");

    let default = temp.path().join("default");
    let mut target = DirectoryTarget::new(&default, RestorePolicy::default()).expect("target");
    restore(&store, root, "/", &mut target).expect("restore");
    assert_eq!(mode_of(&default.join("shared/tool")), 0o755);
    assert_eq!(mode_of(&default.join("shared")), 0o775);
    assert_eq!(
        mode_of(&default.join("tmp")),
        0o1777,
        "the sticky bit stays"
    );

    let kept = temp.path().join("kept");
    let policy = RestorePolicy {
        setid_bits: true,
        ..RestorePolicy::default()
    };
    let mut target = DirectoryTarget::new(&kept, policy).expect("target");
    restore(&store, root, "/", &mut target).expect("restore");
    assert_eq!(mode_of(&kept.join("shared/tool")), 0o6755);
    assert_eq!(mode_of(&kept.join("shared")), 0o2775);
    assert_eq!(mode_of(&kept.join("tmp")), 0o1777);
}

#[test]
fn recorded_owners_are_not_given_by_default_whoever_restores() {
    let store = MemoryStore::default();
    let root = privileged_root(&store);
    let temp = tempfile::tempdir().expect("tempdir");
    let restored = temp.path().join("restored");
    let mut target = DirectoryTarget::new(&restored, RestorePolicy::default()).expect("target");
    let stats = restore(&store, root, "/", &mut target).expect("no chown, no error");
    assert_eq!(
        stats.owners_not_restored, 0,
        "nothing was asked, nothing refused"
    );
    // Everything belongs to the restoring user, as the target root does
    // (root included: no chown is even tried).
    let own = owner_of(&restored);
    assert_eq!(own.0, rustix::process::geteuid().as_raw());
    for path in ["shared", "shared/tool", "shared/link", "tmp"] {
        assert_eq!(owner_of(&restored.join(path)), own, "{path}");
    }
}

#[test]
fn same_owner_gives_recorded_owners_or_counts_each_refusal_and_drops_setid_bits() {
    let store = MemoryStore::default();
    let root = privileged_root(&store);
    let temp = tempfile::tempdir().expect("tempdir");
    let restored = temp.path().join("restored");
    let mut target = DirectoryTarget::new(&restored, RestorePolicy::AS_RECORDED).expect("target");
    let stats = restore(&store, root, "/", &mut target).expect("a refused owner is no error");
    let owned = ["shared", "shared/tool", "shared/link", "tmp"];
    if may_give_files_away(temp.path()) {
        assert_eq!(stats.owners_not_restored, 0);
        for path in owned {
            assert_eq!(owner_of(&restored.join(path)), (12345, 12345), "{path}");
        }
        assert_eq!(mode_of(&restored.join("shared/tool")), 0o6755);
        assert_eq!(mode_of(&restored.join("shared")), 0o2775);
    } else {
        // As tar does without root: tried, refused, logged, and the
        // restore goes on with the entries left to the restoring user.
        assert_eq!(stats.owners_not_restored, 4);
        let own = owner_of(&restored);
        for path in owned {
            assert_eq!(owner_of(&restored.join(path)), own, "{path}");
        }
        // A setuid program of someone other than its recorded owner is
        // not made: the bits go with the owner.
        assert_eq!(mode_of(&restored.join("shared/tool")), 0o755);
        assert_eq!(mode_of(&restored.join("shared")), 0o775);
    }
    assert_eq!(
        fs::read(restored.join("shared/tool")).expect("content"),
        b"#!/bin/sh\nid\n"
    );
}

#[test]
fn special_files_are_never_created_only_counted() {
    let store = MemoryStore::default();
    let root = privileged_root(&store);
    for policy in [RestorePolicy::default(), RestorePolicy::AS_RECORDED] {
        let temp = tempfile::tempdir().expect("tempdir");
        let mut target = DirectoryTarget::new(temp.path(), policy).expect("target");
        let stats = restore(&store, root, "/", &mut target).expect("restore goes on");
        assert_eq!(stats.others_skipped, 2, "{policy:?}");
        assert_eq!((stats.files, stats.dirs, stats.symlinks), (1, 2, 1));
        for name in ["fifo", "disk"] {
            assert!(
                fs::symlink_metadata(temp.path().join(name)).is_err(),
                "{name} created under {policy:?}"
            );
        }
    }
}

#[test]
fn a_tar_stream_carries_the_recorded_modes_and_owners() {
    let store = MemoryStore::default();
    let root = privileged_root(&store);
    let mut tar = TarTarget::new(Vec::new());
    let stats = restore(&store, root, "/", &mut tar).expect("tar");
    assert_eq!(stats.others_skipped, 2);
    let bytes = tar.into_inner().expect("bytes");
    let mut archive = tar::Archive::new(bytes.as_slice());
    let mut headers = BTreeMap::new();
    for item in archive.entries().expect("entries") {
        let item = item.expect("entry");
        let path = item.path().expect("path").display().to_string();
        headers.insert(path.trim_end_matches('/').to_owned(), item.header().clone());
    }
    let tool = &headers["shared/tool"];
    assert_eq!(tool.mode().expect("mode"), 0o6755);
    assert_eq!(
        (tool.uid().expect("uid"), tool.gid().expect("gid")),
        (12345, 12345)
    );
    assert_eq!(headers["shared"].mode().expect("mode"), 0o2775);
    assert!(!headers.contains_key("fifo") && !headers.contains_key("disk"));
}
