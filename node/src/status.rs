//! The one place where the node's errors become gRPC statuses (Garage's
//! habit): codes mean what they say, messages keep the input that failed.

use fabric_chunkstore::StoreError;
use tonic::Status;

/// The status for a chunk store error.
pub fn status_from_store_error(err: StoreError) -> Status {
    let message = err.to_string();
    match err {
        StoreError::ChunkMismatch { .. } | StoreError::BadEncoding { .. } => {
            Status::data_loss(message)
        }
        StoreError::MissingChunk { .. } => Status::failed_precondition(message),
        StoreError::SnapshotNotFound { .. } | StoreError::ChunkNotFound { .. } => {
            Status::not_found(message)
        }
        StoreError::Ambiguous { .. } | StoreError::InvalidSnapshot { .. } => {
            Status::invalid_argument(message)
        }
        StoreError::SnapshotExists { .. } => Status::already_exists(message),
        StoreError::Retained { .. } => Status::permission_denied(message),
        StoreError::TooSoon { .. } | StoreError::OverQuota { .. } => {
            Status::resource_exhausted(message)
        }
        StoreError::Corrupt { .. }
        | StoreError::BadTree { .. }
        | StoreError::BadTreeParts { .. } => Status::data_loss(message),
        StoreError::WritesRefused { .. } => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

/// The status for a blocking task that panicked or was cancelled.
pub fn join_error(err: tokio::task::JoinError) -> Status {
    Status::internal(format!("a worker task failed: {err}"))
}
