//! Code generated from etcd's v3 API by `coordinator/build.rs`.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Keys, values and events.
pub mod mvccpb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
}

/// Users and roles (referenced by the KV messages).
pub mod authpb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
}

/// The KV, Lease and other core services.
pub mod etcdserverpb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// The Election service.
pub mod v3electionpb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
}
