//! Dialling other fabric servers: one place that sets the message limits and
//! turns a connection failure into an error naming the address.

use fabric_proto::v1::source_client::SourceClient;
use fabric_proto::v1::storage_client::StorageClient;
use tonic::transport::{Channel, Endpoint};

use crate::transfer::MAX_MESSAGE_BYTES;

/// HTTP/2 flow-control window of one stream. The protocol's default of 64 KiB
/// lets a chunk batch travel only a window at a time, one round trip each;
/// a window of a full batch keeps a transfer streaming.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// HTTP/2 flow-control window of one connection (several streams share it).
pub const CONNECTION_WINDOW_BYTES: u32 = 4 * STREAM_WINDOW_BYTES;

/// A server that could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach {address}: {reason}")]
pub struct ConnectError {
    /// What was dialled.
    pub address: String,
    /// Why it failed, with the transport's own cause.
    pub reason: String,
}

fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A channel to `address` (`http://host:port`; a bare `host:port` gets `http://`).
pub async fn channel(address: &str) -> Result<Channel, ConnectError> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|err| ConnectError {
        address: address.to_owned(),
        reason: describe(&err),
    })?;
    endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .connect()
        .await
        .map_err(|err| ConnectError {
            address: address.to_owned(),
            reason: describe(&err),
        })
}

/// A storage client with the fabric's message limits.
pub async fn storage(address: &str) -> Result<StorageClient<Channel>, ConnectError> {
    Ok(StorageClient::new(channel(address).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A source (pull endpoint) client with the fabric's message limits.
pub async fn source(address: &str) -> Result<SourceClient<Channel>, ConnectError> {
    Ok(SourceClient::new(channel(address).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
