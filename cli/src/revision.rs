//! backy's revision specs for `find -r`, `restore` and `verify`: an id
//! prefix, a count back from the newest (0 = newest), `last`/`latest`, or a
//! tag (all snapshots carrying it). Pure: works on any list of snapshots.

use anyhow::bail;
use fabric_proto::v1::Snapshot;

/// The snapshots of `items` (oldest first) that `spec` names.
pub fn find<'a, T>(
    items: &'a [T],
    spec: &str,
    snapshot: impl Fn(&'a T) -> &'a Snapshot,
) -> anyhow::Result<Vec<&'a T>> {
    let spec = spec.trim();
    if spec.is_empty() {
        bail!("an empty revision spec: give an id prefix, a number (0 = newest), last or a tag");
    }
    let mut ordered: Vec<&T> = items.iter().collect();
    ordered.sort_by_key(|item| snapshot(item).end_time_ms);
    if spec == "last" || spec == "latest" {
        return Ok(ordered.last().copied().into_iter().collect());
    }
    if let Ok(back) = spec.parse::<usize>()
        && spec.len() < 6
    {
        return Ok(ordered
            .len()
            .checked_sub(back + 1)
            .map(|index| ordered[index])
            .into_iter()
            .collect());
    }
    let by_id: Vec<&T> = ordered
        .iter()
        .copied()
        .filter(|item| {
            let s = snapshot(item);
            s.id.starts_with(spec) || s.name == spec
        })
        .collect();
    // Every run of a sync snapshot has its name: the newest is the current
    // one (they are ordered oldest first).
    let all_sync_by_name = by_id.len() > 1
        && by_id.iter().all(|item| {
            let s = snapshot(item);
            s.name == spec && s.r#type() == fabric_proto::v1::SnapshotType::Sync
        });
    if all_sync_by_name {
        return Ok(by_id.last().copied().into_iter().collect());
    }
    if !by_id.is_empty() {
        return Ok(by_id);
    }
    Ok(ordered
        .into_iter()
        .filter(|item| snapshot(item).tags.iter().any(|tag| tag == spec))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str, end: i64, tags: &[&str]) -> Snapshot {
        Snapshot {
            id: id.into(),
            end_time_ms: end,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }
    }

    fn ids(found: Vec<&Snapshot>) -> Vec<&str> {
        found.into_iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn specs_name_what_backy_names() {
        let all = vec![
            snapshot("aaa111", 3, &["daily"]),
            snapshot("bbb222", 1, &["daily", "weekly"]),
            snapshot("aab333", 2, &[]),
        ];
        let find = |spec| find(&all, spec, |s| s).map(ids).unwrap();
        assert_eq!(find("0"), ["aaa111"]);
        assert_eq!(find("1"), ["aab333"]);
        assert_eq!(find("2"), ["bbb222"]);
        assert!(find("3").is_empty());
        assert_eq!(find("last"), ["aaa111"]);
        assert_eq!(find("latest"), ["aaa111"]);
        assert_eq!(find("bbb"), ["bbb222"]);
        assert_eq!(find("aa"), ["aab333", "aaa111"]);
        assert_eq!(find("weekly"), ["bbb222"]);
        assert_eq!(find("daily"), ["bbb222", "aaa111"]);
        assert!(find("nothing").is_empty());
    }

    #[test]
    fn a_sync_snapshots_name_finds_the_current_one() {
        let sync = |id: &str, end: i64| Snapshot {
            name: "binlogs/vm".into(),
            r#type: fabric_proto::v1::SnapshotType::Sync as i32,
            ..snapshot(id, end, &[])
        };
        let all = vec![sync("s2", 20), sync("s3", 30), sync("s1", 10)];
        assert_eq!(ids(find(&all, "binlogs/vm", |s| s).unwrap()), ["s3"]);
        // Full snapshots sharing a name stay ambiguous: each is a backup.
        let full = |id: &str, end: i64| Snapshot {
            name: "db/x".into(),
            ..snapshot(id, end, &[])
        };
        let all = vec![full("f1", 1), full("f2", 2)];
        assert_eq!(ids(find(&all, "db/x", |s| s).unwrap()), ["f1", "f2"]);
    }

    #[test]
    fn an_empty_spec_is_explained() {
        let all: Vec<Snapshot> = Vec::new();
        let err = find(&all, " ", |s| s).unwrap_err();
        assert!(err.to_string().contains("empty revision spec"));
    }
}
