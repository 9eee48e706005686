//! The fabric v1 API.
//!
//! This crate owns the .proto files (under `proto/`) and the code generated
//! from them: prost messages always, tonic clients and servers with the
//! `grpc` feature (on by default). The chunk store depends on it without
//! `grpc`, so the records it persists (`Tree`, `Snapshot`) are the very
//! messages the API carries, without pulling in tonic or tokio.
//!
//! With `grpc`, every service uses [`codec::FabricCodec`] (a message that
//! does not decode is the sender's mistake), and [`standard`] adds grpc.health.v1 and server reflection to a
//! server. [`naming`] names snapshot records (B1000's scheme), so the chunk
//! store and the coordinator share it without the coordinator depending on
//! the storage engine. [`coordinator_addresses`] parses the list of
//! coordinator addresses every caller is given and says which coordinator
//! to dial next (the leader a follower names, else the list in order), so
//! nodes and `fabricctl` follow the leader alike. This crate must never
//! hold business logic beyond that: only the API, the names of its
//! records, the coordinator addresses, and the glue every server needs to
//! expose it.

/// Package `fabric.v1`: every message, and (feature `grpc`) every service.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/fabric.v1.rs"));
}

/// The encoded `FileDescriptorSet` of every fabric .proto file, as served by
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fabric_descriptor.bin"));

/// Fully qualified names of the fabric's gRPC services.
pub mod service_names {
    /// A node's chunk store.
    pub const STORAGE: &str = "fabric.v1.Storage";
    /// A client agent's pull endpoint.
    pub const SOURCE: &str = "fabric.v1.Source";
    /// The coordinator.
    pub const COORDINATOR: &str = "fabric.v1.Coordinator";
}

pub mod naming;

pub mod coordinator_addresses;

#[cfg(feature = "grpc")]
pub mod codec;

#[cfg(feature = "grpc")]
pub mod standard;

/// A proto enum value as people read it: lower case, without the enum's
/// prefix (`RUN_STATE_COPYING` -> `copying`, `COPY_STATE_DONE` -> `done`).
/// For messages and tables; the JSON of listings uses the same words.
pub fn enum_word(full_name: &str) -> String {
    let word = match full_name.find("_STATE_") {
        Some(at) => &full_name[at + "_STATE_".len()..],
        None => full_name
            .split_once('_')
            .map_or(full_name, |(_, rest)| rest),
    };
    word.to_lowercase()
}

/// A job's interval (or any exact duration) in one spelling everywhere:
/// the largest of d, h, m, s that states it exactly (`86400` -> `1d`,
/// `5400` -> `90m`). Job files accept it back.
pub fn duration_word(seconds: u64) -> String {
    match seconds {
        0 => "0s".to_owned(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A byte count as people read it, in IEC units (`512 B`, `1.5 MiB`):
/// the CLI's tables and the coordinator's status page say sizes alike.
pub fn bytes_word(count: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Length in bytes of a chunk or tree id (BLAKE3-256).
pub const ID_LEN: usize = 32;

#[cfg(test)]
mod enum_word_tests {
    #[test]
    fn enum_values_read_as_words() {
        assert_eq!(super::enum_word("RUN_STATE_COPYING"), "copying");
        assert_eq!(super::enum_word("COPY_STATE_DONE"), "done");
        assert_eq!(super::enum_word("SNAPSHOT_STATE_DAMAGED"), "damaged");
        assert_eq!(super::enum_word("DIRECTION_PUSH"), "push");
    }

    #[test]
    fn durations_take_their_largest_exact_unit() {
        assert_eq!(super::duration_word(86_400), "1d");
        assert_eq!(super::duration_word(5400), "90m");
        assert_eq!(super::duration_word(7200), "2h");
        assert_eq!(super::duration_word(61), "61s");
    }
}
