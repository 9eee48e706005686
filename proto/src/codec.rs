//! The codec of every fabric service: prost's, except that a message that
//! does not decode is `INVALID_ARGUMENT` (the sender's mistake), where
//! tonic's prost codec answers `INTERNAL`, which reads as the server's fault
//! and which monitoring counts as one.
//!
//! It must never change how a message is encoded or decoded: only the
//! status of a failed decode.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode failures as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct FabricCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for FabricCodec<T, U> {
    fn default() -> Self {
        Self {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for FabricCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = FabricDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        FabricDecoder {
            inner: self.inner.decoder(),
            _message: PhantomData,
        }
    }
}

/// [`ProstDecoder`] with decode failures as `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct FabricDecoder<U> {
    inner: ProstDecoder<U>,
    _message: PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for FabricDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            Status::invalid_argument(format!(
                "a message that does not decode as {}: {}",
                std::any::type_name::<U>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("the expected message"),
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
