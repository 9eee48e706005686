//! Compiles etcd's v3 API (vendored under `etcd-api/`, see its README) with
//! protox, so the etcd state engine needs no system `protoc`: the same
//! pure-Rust path `fabric-proto` takes for the fabric's own API. Clients
//! only; the coordinator never serves etcd's API.

const ETCD_PROTO_FILES: &[&str] = &[
    "etcd-api/etcd/api/etcdserverpb/rpc.proto",
    "etcd-api/etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=etcd-api");
    let descriptors = protox::compile(ETCD_PROTO_FILES, ["etcd-api"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
