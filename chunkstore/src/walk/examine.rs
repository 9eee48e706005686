//! Listing a directory and examining its entries, relative to the open
//! directory: one `getdents64` buffer per directory and one `statx` per
//! entry, with no path lookup from `/` and no allocation per entry beyond
//! its name. An unchanged re-backup does little else, so this is its cost.
//!
//! Owns [`EntryStat`], the metadata the walk records of an entry, whether it
//! came from here or from `std::fs`. Never reads file content, never follows
//! a symlink.

use std::ffi::OsStr;
use std::fs::Metadata;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, Statx, StatxFlags};
use rustix::io::Errno;

/// What kind of entry the walk sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EntryType {
    File,
    Dir,
    Symlink,
    /// Devices, FIFOs, sockets: recorded with their metadata only.
    Other,
}

/// The metadata recorded of an entry (a `stat`, without the fields the walk
/// never looks at).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct EntryStat {
    pub kind: EntryType,
    /// Permission bits and file type, as `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
    pub device: u64,
    pub links: u64,
}

/// Nanoseconds since the epoch, saturating (a far-future time stays far).
pub(super) fn nanos(seconds: i64, nanoseconds: i64) -> i64 {
    seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(nanoseconds)
}

impl From<&Metadata> for EntryStat {
    fn from(meta: &Metadata) -> Self {
        let file_type = meta.file_type();
        let kind = if file_type.is_file() {
            EntryType::File
        } else if file_type.is_dir() {
            EntryType::Dir
        } else if file_type.is_symlink() {
            EntryType::Symlink
        } else {
            debug_assert!(
                file_type.is_block_device()
                    || file_type.is_char_device()
                    || file_type.is_fifo()
                    || file_type.is_socket()
            );
            EntryType::Other
        };
        Self {
            kind,
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.len(),
            mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
            inode: meta.ino(),
            device: meta.dev(),
            links: meta.nlink(),
        }
    }
}

impl From<&Statx> for EntryStat {
    fn from(statx: &Statx) -> Self {
        let mode = u32::from(statx.stx_mode);
        let kind = match FileType::from_raw_mode(mode) {
            FileType::RegularFile => EntryType::File,
            FileType::Directory => EntryType::Dir,
            FileType::Symlink => EntryType::Symlink,
            _ => EntryType::Other,
        };
        Self {
            kind,
            mode,
            uid: statx.stx_uid,
            gid: statx.stx_gid,
            size: statx.stx_size,
            mtime_ns: nanos(statx.stx_mtime.tv_sec, i64::from(statx.stx_mtime.tv_nsec)),
            ctime_ns: nanos(statx.stx_ctime.tv_sec, i64::from(statx.stx_ctime.tv_nsec)),
            inode: statx.stx_ino,
            // As std and glibc make `st_dev` of the two numbers, so that the
            // devices recorded before and after compare.
            device: rustix::fs::makedev(statx.stx_dev_major, statx.stx_dev_minor),
            links: u64::from(statx.stx_nlink),
        }
    }
}

/// Bytes of directory entries read per `getdents64` call.
const LISTING_BUFFER: usize = 32 * 1024;

/// A directory opened for listing and examining its entries.
pub(super) struct OpenDirectory {
    fd: OwnedFd,
    path: PathBuf,
}

impl OpenDirectory {
    /// Open the directory `path`. Whatever has replaced it since it was
    /// examined (a symlink, a file) is refused with `ENOTDIR`: a symlink is
    /// never followed.
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            fd,
            path: path.to_owned(),
        })
    }

    /// The names of the directory's entries (without `.` and `..`), in the
    /// order the file system lists them.
    pub fn names(&self) -> io::Result<Vec<Vec<u8>>> {
        let mut buffer = vec![MaybeUninit::<u8>::uninit(); LISTING_BUFFER];
        let mut listing = RawDir::new(&self.fd, &mut buffer);
        let mut names = Vec::new();
        while let Some(item) = listing.next() {
            let item = item?;
            let name = item.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        Ok(names)
    }

    /// The metadata of entry `name`, without following a symlink.
    pub fn examine(&self, name: &[u8]) -> io::Result<EntryStat> {
        match rustix::fs::statx(
            &self.fd,
            OsStr::from_bytes(name),
            AtFlags::SYMLINK_NOFOLLOW,
            StatxFlags::BASIC_STATS,
        ) {
            Ok(statx) => Ok(EntryStat::from(&statx)),
            // No statx (a kernel before 4.11, or a seccomp filter that
            // refuses it): std falls back to lstat.
            Err(Errno::NOSYS | Errno::PERM) => {
                std::fs::symlink_metadata(self.path.join(OsStr::from_bytes(name)))
                    .map(|meta| EntryStat::from(&meta))
            }
            Err(errno) => Err(errno.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn an_examined_entry_has_the_metadata_std_reports() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("file"), b"some bytes").expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        symlink("file", dir.path().join("link")).expect("symlink");
        std::fs::hard_link(dir.path().join("file"), dir.path().join("other-link"))
            .expect("hard link");

        let open = OpenDirectory::open(dir.path()).expect("open");
        let mut names = open.names().expect("list");
        names.sort();
        assert_eq!(
            names,
            [&b"file"[..], b"link", b"other-link", b"sub"].map(<[u8]>::to_vec)
        );
        for name in &names {
            let path = dir.path().join(OsStr::from_bytes(name));
            let expected = EntryStat::from(&std::fs::symlink_metadata(&path).expect("lstat"));
            assert_eq!(open.examine(name).expect("examine"), expected);
        }
        let file = open.examine(b"file").expect("file");
        assert_eq!((file.kind, file.size, file.links), (EntryType::File, 10, 2));
        let link = open.examine(b"link").expect("link");
        assert_eq!(link.kind, EntryType::Symlink);
    }

    #[test]
    fn a_directory_listing_holds_every_name_of_a_large_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        // More than one listing buffer's worth of long names.
        let expected: Vec<Vec<u8>> = (0..1000)
            .map(|index| format!("{index:04}-{}", "n".repeat(100)).into_bytes())
            .collect();
        for name in &expected {
            std::fs::write(dir.path().join(OsStr::from_bytes(name)), b"").expect("write");
        }
        let mut names = OpenDirectory::open(dir.path())
            .expect("open")
            .names()
            .expect("list");
        names.sort();
        assert_eq!(names, expected);
    }

    #[test]
    fn a_symlink_is_not_opened_as_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("real")).expect("mkdir");
        symlink("real", dir.path().join("link")).expect("symlink");
        let err = OpenDirectory::open(&dir.path().join("link"))
            .err()
            .expect("a symlink is refused");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
    }

    #[test]
    fn a_vanished_entry_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = OpenDirectory::open(dir.path()).expect("open");
        let err = open.examine(b"gone").expect_err("nothing there");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
