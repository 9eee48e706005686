//! The mount table: which directories are mount points of virtual or network
//! file systems a backup of `/` (or one with `one_file_system`) must not
//! descend into. Parsing is pure; only [`read_mount_table`] touches /proc.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// Where it is mounted (octal escapes such as `\040` decoded).
    pub mount_point: PathBuf,
    /// The file system type, e.g. `ext4`, `proc`, `fuse.sshfs`.
    pub fs_type: String,
    /// The `major:minor` device the kernel reports for it.
    pub device: (u32, u32),
}

/// File system types a backup skips: kernel views (proc, sysfs, cgroups...),
/// memory-backed ones (tmpfs) and network ones (nfs, cifs, sshfs...).
const SKIPPED_TYPES: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "tmpfs",
    "ramfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "mqueue",
    "hugetlbfs",
    "fusectl",
    "configfs",
    "autofs",
    "binfmt_misc",
    "efivarfs",
    "selinuxfs",
    "rpc_pipefs",
    "nfsd",
    "nsfs",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ncpfs",
    "afs",
    "ceph",
    "glusterfs",
    "lustre",
    "9p",
    "fuse.sshfs",
    "fuse.rclone",
    "fuse.s3fs",
    "fuse.glusterfs",
    "fuse.gvfsd-fuse",
    "fuse.portal",
];

/// Whether a backup must skip a file system of type `fs_type`.
pub fn is_skipped_fs_type(fs_type: &str) -> bool {
    SKIPPED_TYPES.contains(&fs_type)
}

/// Decode mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut index = 0;
    while index < field.len() {
        let digits = field.get(index + 1..index + 4);
        match digits {
            Some(digits)
                if field[index] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)) =>
            {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, digit| acc * 8 + u32::from(digit - b'0'));
                match u8::try_from(value) {
                    Ok(byte) => out.push(byte),
                    Err(_) => out.extend_from_slice(&field[index..index + 4]),
                }
                index += 4;
            }
            _ => {
                out.push(field[index]);
                index += 1;
            }
        }
    }
    out
}

/// Parse one mountinfo line:
/// `36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw`.
fn parse_line(line: &[u8]) -> Option<MountInfo> {
    let fields: Vec<&[u8]> = line
        .split(|&byte| byte == b' ')
        .filter(|field| !field.is_empty())
        .collect();
    let separator = fields.iter().position(|field| *field == b"-")?;
    if separator < 6 {
        return None;
    }
    let device = std::str::from_utf8(fields[2]).ok()?;
    let (major, minor) = device.split_once(':')?;
    let fs_type = std::str::from_utf8(fields.get(separator + 1)?).ok()?;
    Some(MountInfo {
        mount_point: PathBuf::from(OsStr::from_bytes(&unescape(fields[4]))),
        fs_type: fs_type.to_owned(),
        device: (major.parse().ok()?, minor.parse().ok()?),
    })
}

/// Parse the text of `/proc/self/mountinfo`. Lines that do not have the
/// documented shape are left out rather than failing the whole table.
pub fn parse_mountinfo(text: &[u8]) -> Vec<MountInfo> {
    text.split(|&byte| byte == b'\n')
        .filter_map(parse_line)
        .collect()
}

/// Mount points whose file system a backup skips, with their type. When a
/// point is mounted over several times, the last (visible) mount decides.
pub fn skipped_mount_points(mounts: &[MountInfo]) -> HashMap<PathBuf, String> {
    let mut visible: HashMap<&Path, &str> = HashMap::new();
    for mount in mounts {
        visible.insert(&mount.mount_point, &mount.fs_type);
    }
    visible
        .into_iter()
        .filter(|(_, fs_type)| is_skipped_fs_type(fs_type))
        .map(|(point, fs_type)| (point.to_owned(), fs_type.to_owned()))
        .collect()
}

/// The skipped mount points of this process's mount namespace.
pub fn read_mount_table() -> std::io::Result<HashMap<PathBuf, String>> {
    let text = std::fs::read("/proc/self/mountinfo")?;
    Ok(skipped_mount_points(&parse_mountinfo(&text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
25 24 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate
26 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=1000k
27 22 0:25 / /tmp rw shared:3 - tmpfs tmpfs rw
28 22 0:40 / /mnt/my\\040share rw,relatime shared:40 - nfs4 server:/export rw,vers=4.2
29 22 253:2 / /home rw,relatime - ext4 /dev/vda2 rw
30 22 0:50 / /home/me/remote rw,nosuid,nodev - fuse.sshfs me@host:/ rw
31 22 0:51 / /tmp rw - ext4 /dev/vdb rw
garbage line
";

    #[test]
    fn parses_fields_and_escapes() {
        let mounts = parse_mountinfo(SAMPLE.as_bytes());
        assert_eq!(mounts.len(), 10, "the garbage line is left out");
        assert_eq!(
            mounts[0],
            MountInfo {
                mount_point: PathBuf::from("/"),
                fs_type: "ext4".to_owned(),
                device: (253, 1),
            }
        );
        assert_eq!(mounts[1].fs_type, "proc");
        assert_eq!(mounts[6].mount_point, PathBuf::from("/mnt/my share"));
        assert_eq!(mounts[6].fs_type, "nfs4");
        assert_eq!(mounts[6].device, (0, 40));
    }

    #[test]
    fn optional_fields_do_not_shift_the_type() {
        let line = b"40 22 0:60 / /data rw shared:5 master:3 propagate_from:2 unbindable - xfs /dev/sdb rw";
        let mounts = parse_mountinfo(line);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].fs_type, "xfs");
        assert_eq!(mounts[0].mount_point, PathBuf::from("/data"));
        let none = b"41 22 0:61 / /plain rw - btrfs /dev/sdc rw";
        assert_eq!(parse_mountinfo(none)[0].fs_type, "btrfs");
    }

    #[test]
    fn skipped_points_are_the_virtual_and_network_ones() {
        let skipped = skipped_mount_points(&parse_mountinfo(SAMPLE.as_bytes()));
        let mut points: Vec<&str> = skipped.keys().filter_map(|p| p.to_str()).collect();
        points.sort_unstable();
        // /tmp was mounted over by ext4: the visible mount is not skipped.
        assert_eq!(
            points,
            [
                "/dev",
                "/home/me/remote",
                "/mnt/my share",
                "/proc",
                "/sys",
                "/sys/fs/cgroup"
            ]
        );
        assert_eq!(skipped[Path::new("/home/me/remote")], "fuse.sshfs");
    }

    #[test]
    fn unescape_leaves_non_escapes_alone() {
        assert_eq!(unescape(br"a\040b\134c"), b"a b\\c");
        assert_eq!(unescape(br"trailing\04"), br"trailing\04");
        assert_eq!(unescape(br"\999x"), br"\999x");
    }

    #[test]
    fn this_machine_has_a_readable_table() {
        let text = std::fs::read("/proc/self/mountinfo").expect("mountinfo readable on Linux");
        let mounts = parse_mountinfo(&text);
        assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
