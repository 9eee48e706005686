//! Compiles the .proto files with protox (pure Rust, so no system `protoc` is
//! needed) and generates prost messages plus tonic clients and servers. The
//! service modules carry `#[cfg(feature = "grpc")]`, so the messages alone
//! build without tonic.

use std::path::PathBuf;

use prost::Message;

const PROTO_FILES: &[&str] = &[
    "proto/fabric/v1/store.proto",
    "proto/fabric/v1/transfer.proto",
    "proto/fabric/v1/storage.proto",
    "proto/fabric/v1/coordinator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(PROTO_FILES, ["proto"])?;

    // compile_fds does not write the descriptor set that server reflection
    // serves, so write it here.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("fabric_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        // Chunk bytes decode as slices of the received message's buffer,
        // not as a copy: a node takes every byte of every upload this way.
        .bytes(".fabric.v1.ChunkData.data")
        // prost's codec, but a message that does not decode is
        // INVALID_ARGUMENT (the sender's mistake), not INTERNAL.
        .codec_path("crate::codec::FabricCodec")
        .server_mod_attribute(".", "#[cfg(feature = \"grpc\")]")
        .client_mod_attribute(".", "#[cfg(feature = \"grpc\")]")
        .compile_fds(descriptors)?;
    Ok(())
}
