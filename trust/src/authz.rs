//! The authorization table: every RPC of every fabric server, and who may
//! call it. One table, checked in one place ([`crate::layer`]) for every
//! server; an RPC that is not in it is refused to everyone, and a test
//! fails when an RPC of the .proto files is missing from it.
//!
//! The table says which *roles* may call an RPC. Some RPCs narrow it further
//! by the caller's *name*, in the service that serves them, as the comments
//! on the rows say: a node may register and hold a session only under its
//! own id; a client sees and restores only its own host's snapshots and
//! commits only under its own host name; `Source.Pull` serves only the
//! storage node the coordinator assigned to an active pull of that agent.
//!
//! Adding an RPC: add its row here in the same change, with the fewest roles
//! that need it, and its line in ARCHITECTURE.md's table.

use crate::identity::Role;

/// Who may call an RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without credentials (health, for probes).
    Anyone,
    /// Any caller with a valid certificate or token.
    Authenticated,
    /// Callers with one of these roles.
    Roles(&'static [Role]),
}

use Role::{Client, Monitor, Node, Operator};

const OPERATOR: Access = Access::Roles(&[Operator]);
const READERS: Access = Access::Roles(&[Operator, Monitor]);

/// Who may read a server's metrics port (`GET /metrics`, served by
/// [`crate::metrics_port`]): it is plain HTTP, not an RPC, so it has no row
/// in [`TABLE`]. A server running with `--insecure-plaintext` lets anyone.
pub const METRICS_SCRAPERS: &[Role] = &[Operator, Monitor];

/// RPC path (`/package.Service/Method`) -> who may call it.
pub const TABLE: &[(&str, Access)] = &[
    // Health, for probes and load balancers: never needs credentials.
    ("/grpc.health.v1.Health/Check", Access::Anyone),
    ("/grpc.health.v1.Health/Watch", Access::Anyone),
    // Discovery of the API: any authenticated caller.
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Access::Authenticated,
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Access::Authenticated,
    ),
    // The coordinator.
    // Only under the node's own id (the service checks the name).
    (
        "/fabric.v1.Coordinator/RegisterNode",
        Access::Roles(&[Node]),
    ),
    ("/fabric.v1.Coordinator/Session", Access::Roles(&[Node])),
    ("/fabric.v1.Coordinator/SubmitJobs", OPERATOR),
    ("/fabric.v1.Coordinator/GetJob", READERS),
    ("/fabric.v1.Coordinator/ListJobs", READERS),
    ("/fabric.v1.Coordinator/ListRuns", READERS),
    ("/fabric.v1.Coordinator/GetRun", READERS),
    ("/fabric.v1.Coordinator/WatchRun", READERS),
    ("/fabric.v1.Coordinator/RetryRun", OPERATOR),
    ("/fabric.v1.Coordinator/CancelRun", OPERATOR),
    // Addresses and states; nodes resolve copy targets with it, clients
    // find where their snapshots are.
    (
        "/fabric.v1.Coordinator/ListNodes",
        Access::Roles(&[Operator, Monitor, Node, Client]),
    ),
    // A client sees only its own host's entries (the service filters).
    (
        "/fabric.v1.Coordinator/ListCatalog",
        Access::Roles(&[Operator, Monitor, Client]),
    ),
    ("/fabric.v1.Coordinator/PauseJob", OPERATOR),
    ("/fabric.v1.Coordinator/ResumeJob", OPERATOR),
    ("/fabric.v1.Coordinator/DeleteJob", OPERATOR),
    ("/fabric.v1.Coordinator/RunJob", OPERATOR),
    ("/fabric.v1.Coordinator/Check", READERS),
    // A monitor only with `dry_run` (the service checks).
    (
        "/fabric.v1.Coordinator/Forget",
        Access::Roles(&[Operator, Monitor]),
    ),
    // Grants a GC lease on a storage node and waits for its report.
    ("/fabric.v1.Coordinator/CollectGarbage", OPERATOR),
    ("/fabric.v1.Coordinator/DrainNode", OPERATOR),
    ("/fabric.v1.Coordinator/ResetSync", OPERATOR),
    ("/fabric.v1.Coordinator/CreateToken", OPERATOR),
    ("/fabric.v1.Coordinator/ListTokens", OPERATOR),
    ("/fabric.v1.Coordinator/RevokeToken", OPERATOR),
    // A storage node. A client commits only under its own host name and
    // reads only its own host's snapshots (the service checks).
    (
        "/fabric.v1.Storage/Upload",
        Access::Roles(&[Operator, Node, Client]),
    ),
    (
        "/fabric.v1.Storage/Restore",
        Access::Roles(&[Operator, Client]),
    ),
    // By id: an id is only known to who has the content or read a tree
    // that names it.
    (
        "/fabric.v1.Storage/GetTree",
        Access::Roles(&[Operator, Node, Client]),
    ),
    (
        "/fabric.v1.Storage/GetChunks",
        Access::Roles(&[Operator, Node, Client]),
    ),
    (
        "/fabric.v1.Storage/ListSnapshots",
        Access::Roles(&[Operator, Monitor, Node, Client]),
    ),
    (
        "/fabric.v1.Storage/GetNewestSnapshot",
        Access::Roles(&[Operator, Monitor, Node, Client]),
    ),
    (
        "/fabric.v1.Storage/GetSnapshot",
        Access::Roles(&[Operator, Monitor, Node, Client]),
    ),
    ("/fabric.v1.Storage/DeleteSnapshot", OPERATOR),
    ("/fabric.v1.Storage/Stats", READERS),
    ("/fabric.v1.Storage/Verify", OPERATOR),
    ("/fabric.v1.Storage/CollectGarbage", OPERATOR),
    // Nodes: an agent for its own host's snapshots, a storage node to
    // itself (the service checks).
    (
        "/fabric.v1.Storage/CopySnapshot",
        Access::Roles(&[Operator, Node]),
    ),
    // A client's agent: only the storage node assigned to an active pull of
    // this agent, for that job's includes (the service checks).
    ("/fabric.v1.Source/Pull", Access::Roles(&[Node])),
];

/// Who may call the RPC at `path`; `None` for an RPC not in the table,
/// which nobody may call.
pub fn access(path: &str) -> Option<Access> {
    TABLE
        .iter()
        .find(|(rpc, _)| *rpc == path)
        .map(|(_, access)| *access)
}

/// The roles `access` lets in, for messages ("needs role operator or monitor").
pub fn describe(access: Access) -> String {
    match access {
        Access::Anyone => "anyone".to_owned(),
        Access::Authenticated => "any authenticated caller".to_owned(),
        Access::Roles(roles) => {
            let names: Vec<&str> = roles.iter().map(|role| role.as_str()).collect();
            match names.as_slice() {
                [one] => format!("role {one}"),
                [rest @ .., last] => format!("role {} or {last}", rest.join(", ")),
                [] => "nobody".to_owned(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::*;

    /// Every method of every service in the .proto files and of the
    /// standard services the servers add.
    fn served_rpcs() -> BTreeSet<String> {
        let mut rpcs = BTreeSet::new();
        let sets = [
            fabric_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ];
        for encoded in sets {
            let set = prost_types::FileDescriptorSet::decode(encoded).unwrap();
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        rpcs.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        rpcs.insert("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".into());
        rpcs.insert("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo".into());
        rpcs
    }

    #[test]
    fn every_rpc_of_the_api_has_its_row_and_every_row_an_rpc() {
        let served = served_rpcs();
        let table: BTreeSet<String> = TABLE.iter().map(|(rpc, _)| (*rpc).to_owned()).collect();
        let missing: Vec<_> = served.difference(&table).collect();
        assert!(
            missing.is_empty(),
            "RPCs without a row in the authorization table: {missing:?}"
        );
        let stale: Vec<_> = table.difference(&served).collect();
        assert!(stale.is_empty(), "rows for RPCs nobody serves: {stale:?}");
        assert_eq!(table.len(), TABLE.len(), "an RPC has two rows");
    }

    #[test]
    fn only_health_is_open_to_anyone_and_destruction_is_for_operators() {
        for (rpc, access) in TABLE {
            if *access == Access::Anyone {
                assert!(rpc.starts_with("/grpc.health.v1.Health/"), "{rpc}");
            }
        }
        for rpc in [
            "/fabric.v1.Storage/DeleteSnapshot",
            "/fabric.v1.Storage/CollectGarbage",
            "/fabric.v1.Coordinator/SubmitJobs",
        ] {
            assert_eq!(access(rpc), Some(OPERATOR), "{rpc}");
        }
        // Copies: operators, and nodes as the storage service narrows it
        // (an agent's own host's snapshots, a storage node to itself).
        assert_eq!(
            access("/fabric.v1.Storage/CopySnapshot"),
            Some(Access::Roles(&[Role::Operator, Role::Node]))
        );
        assert_eq!(access("/fabric.v1.Storage/NoSuchThing"), None);
    }

    /// The roles `rpc` lets in.
    fn roles(rpc: &str) -> &'static [Role] {
        match access(rpc) {
            Some(Access::Roles(roles)) => roles,
            other => panic!("{rpc}: {other:?}"),
        }
    }

    #[test]
    fn whoever_may_restore_may_browse_and_a_monitor_may_not_read_trees() {
        // `fabricctl ls` and `diff` read a snapshot's record and its trees:
        // every role that may restore it may do both, and reading trees
        // (file names, sizes, chunk ids) stays closed to a monitor, who
        // may not restore.
        for role in roles("/fabric.v1.Storage/Restore") {
            for rpc in [
                "/fabric.v1.Storage/GetTree",
                "/fabric.v1.Storage/GetSnapshot",
            ] {
                assert!(
                    roles(rpc).contains(role),
                    "{role:?} may restore but not call {rpc}"
                );
            }
        }
        assert!(!roles("/fabric.v1.Storage/GetTree").contains(&Role::Monitor));
        assert!(!roles("/fabric.v1.Storage/Restore").contains(&Role::Monitor));
    }
}
