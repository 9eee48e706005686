//! Dialling other fabric servers: one place that sets the message limits,
//! speaks TLS with the process's credentials, demands the identity the
//! caller expects of the server ([`Peer`]), and turns a failure into an
//! error naming the address.

use fabric_proto::v1::source_client::SourceClient;
use fabric_proto::v1::storage_client::StorageClient;
use fabric_trust::{Expect, Transport};
use tonic::transport::{Channel, Endpoint};

use crate::transfer::MAX_MESSAGE_BYTES;

/// Largest HTTP/2 frame this side accepts (the protocol's default is 16 KiB).
/// A chunk of 1 MiB then crosses in one frame instead of 64, each with its
/// own header, flow-control accounting and wake-up: measured, a restore's
/// client CPU fell by a quarter with it. It bounds one frame's buffer, not
/// what is in flight (the windows do that).
pub const MAX_FRAME_BYTES: u32 = 1024 * 1024;

/// HTTP/2 flow-control window of one stream. The protocol's default of 64 KiB
/// lets a chunk batch travel only a window at a time, one round trip each;
/// a window of a full batch keeps a transfer streaming.
///
/// Not adaptive (hyper's BDP estimate): that sizes a connection's window
/// like one stream's, so a stream its caller does not read (a restore left
/// waiting) holds the whole connection's window and stalls every other
/// stream on it; the hostile tests caught exactly that.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// HTTP/2 flow-control window of one connection (several streams share it).
pub const CONNECTION_WINDOW_BYTES: u32 = 4 * STREAM_WINDOW_BYTES;

/// A server to dial: where, and who it must prove to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// `https://host:port` (a bare `host:port` is accepted).
    pub address: String,
    /// The identity its certificate must carry.
    pub expect: Expect,
}

impl Peer {
    /// Node `id` at `address`.
    pub fn node(id: &str, address: &str) -> Self {
        Self {
            address: address.to_owned(),
            expect: Expect::Node(id.to_owned()),
        }
    }

    /// Whichever node answers at `address` (an operator's `--node ADDR`).
    pub fn any_node(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            expect: Expect::AnyNode,
        }
    }

    /// The coordinator at `address`.
    pub fn coordinator(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            expect: Expect::Coordinator,
        }
    }
}

/// A server that could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach {address}: {reason}")]
pub struct ConnectError {
    /// What was dialled.
    pub address: String,
    /// Why it failed, with the transport's own cause.
    pub reason: String,
}

/// An error with its causes, each once.
pub(crate) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A channel to `peer` over `transport`.
pub async fn channel(peer: &Peer, transport: &Transport) -> Result<Channel, ConnectError> {
    let address = peer.address.as_str();
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("{}://{address}", transport.scheme())
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|err| ConnectError {
        address: address.to_owned(),
        reason: describe(&err),
    })?;
    let endpoint = endpoint
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES);
    fabric_trust::transport::connect(endpoint, transport, peer.expect.clone())
        .await
        .map_err(|err| ConnectError {
            address: address.to_owned(),
            reason: describe(&err),
        })
}

/// A storage client with the fabric's message limits.
pub async fn storage(
    peer: &Peer,
    transport: &Transport,
) -> Result<StorageClient<Channel>, ConnectError> {
    Ok(StorageClient::new(channel(peer, transport).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A source (pull endpoint) client with the fabric's message limits.
pub async fn source(
    peer: &Peer,
    transport: &Transport,
) -> Result<SourceClient<Channel>, ConnectError> {
    Ok(SourceClient::new(channel(peer, transport).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
