//! What a restore into a directory does with an entry already at a path it
//! is about to write ([`ExistingEntries`]), as one pure decision
//! ([`decide`]) that the [`DirectoryTarget`](super::DirectoryTarget) applies
//! and a dry run reports, so both always agree.
//!
//! It never touches the file system: the caller says what is at the path
//! ([`Found`]) and gets back what to do ([`Action`]). It never lets a
//! restore replace a directory with something else, nor make a directory
//! where something else is, whatever it is asked: that would mean removing a
//! whole tree the restore did not write.

/// What to do with an entry already at a path a restore writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExistingEntries {
    /// Stop at the first one ([`Action::Conflict`]): nothing already there
    /// is changed. A directory already there counts too, since the
    /// restore would give it the recorded mode and times.
    Refuse,
    /// Replace a file, symlink or hard link already there, and give a
    /// directory already there the recorded metadata (what `DirectoryTarget`
    /// did before there was a choice, so it stays its default).
    #[default]
    Overwrite,
    /// Leave what is there as it is and restore only what is missing:
    /// a directory already there is entered (to fill in what is missing
    /// below it) but keeps its own mode and times.
    Skip,
}

/// What is at a path before the restore writes it (never followed: a
/// symlink is `Other`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing.
    Nothing,
    /// A directory.
    Directory,
    /// A file, a symlink or anything else that is not a directory.
    Other,
}

/// What a restore does at one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing is there: write the entry.
    Create,
    /// Remove what is there (a non-directory) and write the entry.
    Replace,
    /// A directory is there and the entry is one: use it, giving it the
    /// recorded metadata.
    Merge,
    /// A directory is there and the entry is one: use it to restore what is
    /// missing below, keeping its own metadata.
    MergeKeeping,
    /// Leave what is there; the entry is not restored.
    Keep,
    /// Something is there and the restore was asked not to touch it.
    Conflict,
    /// Something is there that no choice lets the restore replace (a
    /// directory where the entry is not one, or the other way round).
    Blocked(&'static str),
}

/// What a restore under `existing` does at a path where `found` is, for an
/// entry that is a directory (`directory`) or not.
pub fn decide(existing: ExistingEntries, found: Found, directory: bool) -> Action {
    use ExistingEntries::{Overwrite, Refuse, Skip};
    match (found, directory, existing) {
        (Found::Nothing, _, _) => Action::Create,
        (_, _, Refuse) => Action::Conflict,
        (Found::Directory, true, Overwrite) => Action::Merge,
        (Found::Directory, true, Skip) => Action::MergeKeeping,
        (Found::Other, true, _) => Action::Blocked(
            "something other than a directory is already there (a symlink is never followed)",
        ),
        (Found::Directory, false, Overwrite) => Action::Blocked("a directory is already there"),
        (Found::Other, false, Overwrite) => Action::Replace,
        (_, false, Skip) => Action::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_choice_decides_as_documented() {
        use Action::*;
        use ExistingEntries::{Overwrite, Refuse, Skip};
        for existing in [Refuse, Overwrite, Skip] {
            assert_eq!(decide(existing, Found::Nothing, true), Create);
            assert_eq!(decide(existing, Found::Nothing, false), Create);
        }
        for found in [Found::Directory, Found::Other] {
            for directory in [true, false] {
                assert_eq!(decide(Refuse, found, directory), Conflict);
            }
        }
        assert_eq!(decide(Overwrite, Found::Other, false), Replace);
        assert_eq!(decide(Overwrite, Found::Directory, true), Merge);
        assert!(matches!(
            decide(Overwrite, Found::Directory, false),
            Blocked(_)
        ));
        assert!(matches!(decide(Overwrite, Found::Other, true), Blocked(_)));
        assert_eq!(decide(Skip, Found::Other, false), Keep);
        assert_eq!(decide(Skip, Found::Directory, false), Keep);
        assert_eq!(decide(Skip, Found::Directory, true), MergeKeeping);
        assert!(matches!(decide(Skip, Found::Other, true), Blocked(_)));
    }
}
