//! Where a sparse file's holes are, as its file system reports them
//! (`SEEK_HOLE` / `SEEK_DATA`), so that the walk feeds them to the chunker
//! as zeros instead of reading them.
//!
//! It only seeks: it never reads or changes the file, and it never moves the
//! walk's reads (they are positioned, `pread`). A file system that cannot say
//! where holes are reports none, and the file is read whole, as before.

use std::fs::File;
use std::io;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

/// A run of the file that reads as zeros: bytes `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hole {
    pub start: u64,
    pub end: u64,
}

/// The holes of one open file, looked up as the walk reaches them.
pub(super) struct Holes<'a> {
    file: &'a File,
    /// False once the file system said it cannot seek for holes.
    supported: bool,
}

impl<'a> Holes<'a> {
    pub fn new(file: &'a File) -> Self {
        Self {
            file,
            supported: true,
        }
    }

    /// The first hole at or after `from` that ends before the end of the
    /// file (the end itself counts as a hole to `SEEK_HOLE`), if any.
    pub fn next_at(&mut self, from: u64) -> io::Result<Option<Hole>> {
        if !self.supported {
            return Ok(None);
        }
        let start = match self.seek(SeekFrom::Hole(from)) {
            Ok(start) => start,
            // `from` is at or past the end.
            Err(Errno::NXIO) => return Ok(None),
            Err(_) => {
                self.supported = false;
                return Ok(None);
            }
        };
        let size = self.file.metadata()?.len();
        if start >= size {
            return Ok(None);
        }
        let end = match self.seek(SeekFrom::Data(start)) {
            Ok(end) => end,
            // No data after it: the hole runs to the end.
            Err(Errno::NXIO) => size,
            Err(_) => {
                self.supported = false;
                return Ok(None);
            }
        };
        Ok((end > start).then_some(Hole { start, end }))
    }

    fn seek(&self, to: SeekFrom) -> Result<u64, Errno> {
        rustix::fs::seek(self.file, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    /// A file of `len` bytes with `data` written at each offset; the rest
    /// is left as holes (where the file system makes holes).
    fn sparse_file(len: u64, data: &[(u64, &[u8])]) -> (tempfile::NamedTempFile, bool) {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(len).unwrap();
        for (offset, bytes) in data {
            file.as_file().write_all_at(bytes, *offset).unwrap();
        }
        file.as_file().sync_all().unwrap();
        let meta = file.as_file().metadata().unwrap();
        let sparse = meta.blocks() * 512 < meta.len();
        (file, sparse)
    }

    #[test]
    fn holes_between_and_after_data_are_found_in_order() {
        let mib = 1 << 20;
        let (file, sparse) = sparse_file(16 * mib, &[(2 * mib, &[1; 4096]), (9 * mib, &[2; 8192])]);
        let mut holes = Holes::new(file.as_file());
        let mut found = Vec::new();
        let mut at = 0;
        while let Some(hole) = holes.next_at(at).unwrap() {
            assert!(hole.start >= at && hole.end > hole.start);
            found.push(hole);
            at = hole.end;
        }
        if !sparse {
            // No holes on this file system: nothing to skip, nothing wrong.
            assert!(found.is_empty());
            return;
        }
        // Block granularity: the holes end at or before the data and start
        // at or after its end.
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0].start, 0);
        assert!(found[0].end <= 2 * mib);
        assert!(found[1].start >= 2 * mib + 4096 && found[1].end <= 9 * mib);
        assert!(found[2].start >= 9 * mib + 8192);
        assert_eq!(found[2].end, 16 * mib);
    }

    #[test]
    fn a_file_without_holes_has_none() {
        let (file, _) = sparse_file(0, &[(0, &[7; 100_000])]);
        assert_eq!(Holes::new(file.as_file()).next_at(0).unwrap(), None);
        assert_eq!(Holes::new(file.as_file()).next_at(500_000).unwrap(), None);
    }
}
