//! Reading the extended attributes of the entries a walk records.
//!
//! Owns the listing and reading of xattrs, by path without following a
//! symlink or from an open file. A file system without xattrs gives none;
//! an attribute removed between the listing and the read is left out. It
//! never writes.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use fabric_proto::v1::ExtendedAttribute;
use rustix::io::Errno;

/// The largest list of names and the largest value Linux allows (64 KiB).
const XATTR_MAX: usize = 64 * 1024;

/// What to read the attributes of.
#[derive(Clone, Copy)]
pub(super) enum XattrSource<'a> {
    /// A path, its last component not followed if it is a symlink.
    Path(&'a Path),
    /// An open file.
    File(&'a std::fs::File),
}

impl XattrSource<'_> {
    fn list(self, buffer: &mut [u8]) -> Result<usize, Errno> {
        match self {
            Self::Path(path) => rustix::fs::llistxattr(path, buffer),
            Self::File(file) => rustix::fs::flistxattr(file.as_fd(), buffer),
        }
    }

    fn get(self, name: &[u8], buffer: &mut [u8]) -> Result<usize, Errno> {
        let name = OsStr::from_bytes(name);
        match self {
            Self::Path(path) => rustix::fs::lgetxattr(path, name, buffer),
            Self::File(file) => rustix::fs::fgetxattr(file.as_fd(), name, buffer),
        }
    }
}

/// Call `read` with a small buffer, then with the largest one when the
/// answer did not fit.
fn with_buffer(mut read: impl FnMut(&mut [u8]) -> Result<usize, Errno>) -> Result<Vec<u8>, Errno> {
    let mut small = [0u8; 1024];
    match read(&mut small) {
        Ok(length) => Ok(small[..length].to_vec()),
        Err(Errno::RANGE) => {
            let mut large = vec![0u8; XATTR_MAX];
            let length = read(&mut large)?;
            large.truncate(length);
            Ok(large)
        }
        Err(errno) => Err(errno),
    }
}

/// The extended attributes of `source`, sorted by name.
pub(super) fn read(source: XattrSource<'_>) -> io::Result<Vec<ExtendedAttribute>> {
    let names = match with_buffer(|buffer| source.list(buffer)) {
        Ok(names) => names,
        // The file system keeps none (or the entry is of a kind that has none).
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(errno) => return Err(errno.into()),
    };
    let mut attributes = Vec::new();
    for name in names
        .split(|&byte| byte == 0)
        .filter(|name| !name.is_empty())
    {
        match with_buffer(|buffer| source.get(name, buffer)) {
            Ok(value) => attributes.push(ExtendedAttribute {
                name: name.to_vec(),
                value,
            }),
            // Removed since it was listed.
            Err(Errno::NODATA) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    attributes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(attributes)
}
