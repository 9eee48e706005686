//! Comparing two directory trees, as a restore check: the demo uses it to
//! prove a restore byte for byte, the tests to prove metadata too. The
//! right tree is a restore of the left under a
//! [`RestorePolicy`], and permission bits are compared as that policy
//! gives them back (without setuid and setgid bits unless it keeps them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fabric_chunkstore::restore::RestorePolicy;

/// What a comparison covered.
#[derive(Debug, Default)]
pub struct Compared {
    /// Entries compared.
    pub entries: u64,
    /// File bytes compared.
    pub bytes: u64,
}

/// Compare the tree `left` with `right`, its restore under `policy`: the
/// same names, kinds, permission bits (the left's as `policy` restores
/// them), symlink targets, file contents, extended attributes of files and
/// directories, and hard links between files of the tree (and with
/// `mtimes`, the modification times of files, symlinks and directories);
/// an error names the first difference. Owners are not compared.
pub fn compare_trees(
    left: &Path,
    right: &Path,
    mtimes: bool,
    policy: RestorePolicy,
) -> anyhow::Result<Compared> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut compared = Compared::default();
    // The first path of each linked inode on either side: two files are
    // links of one file on the left exactly when they are on the right.
    let mut first_link: [HashMap<(u64, u64), PathBuf>; 2] = Default::default();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let (a, b) = (left.join(&relative), right.join(&relative));
        let mut names_a = list(&a)?;
        let mut names_b = list(&b)?;
        names_a.sort();
        names_b.sort();
        if names_a != names_b {
            bail!("{} and {} list different entries", a.display(), b.display());
        }
        for name in names_a {
            let (pa, pb) = (a.join(&name), b.join(&name));
            let (ma, mb) = (
                std::fs::symlink_metadata(&pa)?,
                std::fs::symlink_metadata(&pb)?,
            );
            compared.entries += 1;
            if ma.file_type() != mb.file_type() {
                bail!(
                    "{} is not of the same kind as {}",
                    pb.display(),
                    pa.display()
                );
            }
            if mtimes && (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
                bail!(
                    "{} has another modification time than {}",
                    pb.display(),
                    pa.display()
                );
            }
            if ma.file_type().is_symlink() {
                if std::fs::read_link(&pa)? != std::fs::read_link(&pb)? {
                    bail!(
                        "symlink {} points elsewhere than {}",
                        pb.display(),
                        pa.display()
                    );
                }
                continue;
            }
            // As if every owner asked for was given: an entry whose owner
            // was refused also loses its setid bits, which this cannot know.
            if policy.permission_bits(ma.permissions().mode(), false)
                != mb.permissions().mode() & 0o7777
            {
                bail!(
                    "{} has other permissions than {}",
                    pb.display(),
                    pa.display()
                );
            }
            let attributes = |path: &Path| {
                fabric_chunkstore::walk::extended_attributes(path).with_context(|| {
                    format!("cannot read the extended attributes of {}", path.display())
                })
            };
            if attributes(&pa)? != attributes(&pb)? {
                bail!(
                    "{} has other extended attributes than {}",
                    pb.display(),
                    pa.display()
                );
            }
            if ma.is_dir() {
                stack.push(relative.join(&name));
            } else if ma.is_file() {
                let path = relative.join(&name);
                let firsts = [&ma, &mb].map(|meta| (meta.dev(), meta.ino()));
                let [left_first, right_first] = [0, 1].map(|side| {
                    first_link[side]
                        .entry(firsts[side])
                        .or_insert_with(|| path.clone())
                        .clone()
                });
                if left_first != right_first {
                    bail!(
                        "{} is one file with {}, but {} is one file with {}",
                        pa.display(),
                        left.join(&left_first).display(),
                        pb.display(),
                        right.join(&right_first).display()
                    );
                }
                let same = same_content(&pa, &pb)?;
                if !same {
                    bail!("{} differs from {}", pb.display(), pa.display());
                }
                compared.bytes += ma.len();
            }
        }
    }
    Ok(compared)
}

fn list(dir: &Path) -> anyhow::Result<Vec<std::ffi::OsString>> {
    std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|entry| Ok(entry?.file_name()))
        .collect()
}

fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let mut fa = std::fs::File::open(a).with_context(|| format!("cannot read {}", a.display()))?;
    let mut fb = std::fs::File::open(b).with_context(|| format!("cannot read {}", b.display()))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
    fn read_full(file: &mut std::fs::File, buffer: &mut [u8]) -> std::io::Result<usize> {
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read(&mut buffer[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn tree(root: &Path, linked: bool) {
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a"), b"same bytes").unwrap();
        if linked {
            std::fs::hard_link(root.join("a"), root.join("sub/b")).unwrap();
        } else {
            std::fs::write(root.join("sub/b"), b"same bytes").unwrap();
        }
    }

    #[test]
    fn hard_links_must_match_on_both_sides() {
        let temp = tempfile::tempdir().unwrap();
        let (linked, other_linked, copied) = (
            temp.path().join("linked"),
            temp.path().join("other"),
            temp.path().join("copied"),
        );
        tree(&linked, true);
        tree(&other_linked, true);
        tree(&copied, false);
        let compared =
            compare_trees(&linked, &other_linked, false, RestorePolicy::AS_RECORDED).unwrap();
        assert_eq!(compared.entries, 3);
        for (left, right) in [(&linked, &copied), (&copied, &linked)] {
            let err = compare_trees(left, right, false, RestorePolicy::AS_RECORDED)
                .unwrap_err()
                .to_string();
            assert!(err.contains("one file with"), "{err}");
            assert!(err.contains("sub/b"), "{err}");
        }
    }
}
