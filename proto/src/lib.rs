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
//! the storage engine. This crate must never hold business logic beyond
//! that: only the API, the names of its records, and the glue every server
//! needs to expose it.

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

#[cfg(feature = "grpc")]
pub mod codec;

#[cfg(feature = "grpc")]
pub mod standard;

/// Length in bytes of a chunk or tree id (BLAKE3-256).
pub const ID_LEN: usize = 32;
