//! What a restore into a directory gives back of an entry's recorded
//! privileges: its owner and group, and its setuid and setgid bits, each
//! only when the caller asks for it ([`RestorePolicy`]).
//!
//! A snapshot says what its uploader recorded: a client, or whoever holds
//! its key, can record any mode and any owner. Restored as recorded, a file
//! marked setuid and owned by uid 0 becomes a setuid-root program on the
//! restoring host. So by default a restore does what tar does for a user
//! other than root: entries belong to the user who restores, and the
//! setuid and setgid bits are dropped (the sticky bit and the other
//! permission bits stay).
//!
//! This module owns that rule and nothing else: it never touches the file
//! system (the [`DirectoryTarget`](super::DirectoryTarget) applies it) and
//! never gives back more than the caller asked for. Device nodes, FIFOs
//! and sockets are outside it because no target ever creates them,
//! whatever it is asked: they are counted as skipped and logged.

/// The extended attribute holding a file's capabilities.
const CAPABILITY_ATTRIBUTE: &[u8] = b"security.capability";

/// The setuid and setgid bits of a mode (`S_ISUID | S_ISGID`).
const SETID_BITS: u32 = 0o6000;

/// What a directory restore gives back beyond content, names, permission
/// bits, times and extended attributes. [`Default`] asks for nothing: no
/// owner is changed and setuid and setgid bits are dropped.
///
/// A tar stream ([`TarTarget`](super::TarTarget)) takes no policy: it is
/// data, not an extraction, and carries what was recorded; whoever
/// extracts it applies their own tar's policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestorePolicy {
    /// Give every entry its recorded owner and group (as `tar
    /// --same-owner`). Only root can give a file to someone else: an
    /// owner that cannot be given is logged with its path and counted, and
    /// the entry keeps the restoring user (and loses its setuid and setgid
    /// bits, see [`RestorePolicy::permission_bits`]).
    pub same_owner: bool,
    /// Keep the setuid and setgid bits of files and directories as
    /// recorded, and their file capabilities (`security.capability`, which
    /// grant privileges as setuid does).
    pub setid_bits: bool,
}

impl RestorePolicy {
    /// Everything as recorded: owners and setuid and setgid bits. For
    /// restoring a trusted snapshot as it was (a system, by root) and for
    /// round trips that must come back identical.
    pub const AS_RECORDED: Self = Self {
        same_owner: true,
        setid_bits: true,
    };

    /// Whether the extended attribute `name` is restored: every one but
    /// file capabilities, which only [`Self::setid_bits`] brings back.
    pub fn keeps_attribute(self, name: &[u8]) -> bool {
        self.setid_bits || name != CAPABILITY_ATTRIBUTE
    }

    /// The permission bits (at most `0o7777`) an entry recorded with
    /// `mode` gets: without setuid and setgid unless [`Self::setid_bits`],
    /// and without them either when its recorded owner was asked for and
    /// could not be given (`owner_refused`), since a setuid or setgid
    /// program must not run as an owner other than the one recorded.
    pub fn permission_bits(self, mode: u32, owner_refused: bool) -> u32 {
        let bits = mode & 0o7777;
        if self.setid_bits && !owner_refused {
            bits
        } else {
            bits & !SETID_BITS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_capabilities_are_kept_only_with_the_setid_bits() {
        assert!(!RestorePolicy::default().keeps_attribute(b"security.capability"));
        assert!(RestorePolicy::default().keeps_attribute(b"user.comment"));
        assert!(RestorePolicy::default().keeps_attribute(b"security.selinux"));
        assert!(RestorePolicy::AS_RECORDED.keeps_attribute(b"security.capability"));
    }

    #[test]
    fn setid_bits_are_kept_only_when_asked_and_the_owner_was_not_refused() {
        let recorded = 0o106755;
        assert_eq!(
            RestorePolicy::default().permission_bits(recorded, false),
            0o755
        );
        let keep = RestorePolicy {
            setid_bits: true,
            ..RestorePolicy::default()
        };
        assert_eq!(keep.permission_bits(recorded, false), 0o6755);
        assert_eq!(keep.permission_bits(recorded, true), 0o755);
        assert_eq!(
            RestorePolicy::AS_RECORDED.permission_bits(recorded, false),
            0o6755
        );
        // The sticky bit is no privilege: it stays.
        assert_eq!(
            RestorePolicy::default().permission_bits(0o41777, false),
            0o1777
        );
    }
}
