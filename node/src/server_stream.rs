//! Server streams fed from a blocking thread (`Restore`, `GetChunks`).
//!
//! Two rules hold for every such stream. A send waits at most the node's
//! idle timeout for the caller to take something: a caller that opens a
//! restore and never reads must not pin a blocking thread and the snapshot's
//! chunks forever. And the stream ends in an error unless its producer said
//! it finished: neither a restore nor a chunk answer has an end marker, so a
//! producer that stopped early (it timed out, it panicked, it returned
//! without a word) must never look like a complete answer.
//!
//! This module never decides what is sent; the services do.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// A boxed server stream, as the generated service traits take them.
pub type ItemStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Items in flight between the producer and the caller: a few, so that a
/// caller that stops reading stops the producer soon.
const CAPACITY: usize = 4;

#[derive(Debug, Default)]
enum End {
    /// Still sending, or stopped without a word.
    #[default]
    Open,
    /// Everything was sent (or an error that ends the answer).
    Finished,
    /// Given up: why.
    Abandoned(String),
}

/// Why a send did not go through; the producer stops.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// The caller went away.
    #[error("the caller went away")]
    Gone,
    /// The caller took nothing for the idle timeout.
    #[error("the caller took nothing for {0:?}")]
    Idle(Duration),
}

/// The sending end, used on a blocking thread.
#[derive(Debug)]
pub struct Producer<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    idle: Duration,
    runtime: tokio::runtime::Handle,
    end: Arc<Mutex<End>>,
}

impl<T: Send + 'static> Producer<T> {
    /// Send `item`, waiting at most the idle timeout for room.
    pub fn send(&self, item: Result<T, Status>) -> Result<(), Stopped> {
        if let End::Abandoned(_) = *lock(&self.end) {
            // Given up already: the caller will not read on.
            return Err(Stopped::Idle(self.idle));
        }
        let sent = self
            .runtime
            .block_on(tokio::time::timeout(self.idle, self.tx.send(item)));
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stopped::Gone),
            Err(_) => {
                let stopped = Stopped::Idle(self.idle);
                *lock(&self.end) = End::Abandoned(stopped.to_string());
                Err(stopped)
            }
        }
    }

    /// Everything was sent: the stream ends without an error.
    pub fn finish(self) {
        let mut end = lock(&self.end);
        if matches!(*end, End::Open) {
            *end = End::Finished;
        }
    }

    /// Send `status` as the answer's last word.
    pub fn fail(self, status: Status) {
        if self.send(Err(status)).is_ok() {
            self.finish();
        }
    }
}

fn lock(end: &Mutex<End>) -> std::sync::MutexGuard<'_, End> {
    end.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A stream and its producer; `what` names the answer in the error a stream
/// cut short ends with. Call from within the runtime.
pub fn channel<T: Send + 'static>(what: &str, idle: Duration) -> (Producer<T>, ItemStream<T>) {
    let (tx, rx) = mpsc::channel(CAPACITY);
    let end = Arc::new(Mutex::new(End::Open));
    let producer = Producer {
        tx,
        idle,
        runtime: tokio::runtime::Handle::current(),
        end: end.clone(),
    };
    let what = what.to_owned();
    let last_word = futures::stream::once(async move {
        match std::mem::take(&mut *lock(&end)) {
            End::Finished => None,
            End::Abandoned(reason) => Some(Err(Status::deadline_exceeded(format!(
                "{what} was cut short: {reason}"
            )))),
            End::Open => Some(Err(Status::internal(format!(
                "{what} stopped before its end (see the node's log)"
            )))),
        }
    })
    .filter_map(futures::future::ready);
    (producer, Box::pin(ReceiverStream::new(rx).chain(last_word)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_finished_stream_ends_cleanly() {
        let (producer, stream) = channel::<u32>("test", Duration::from_secs(5));
        tokio::task::spawn_blocking(move || {
            producer.send(Ok(1)).unwrap();
            producer.finish();
        })
        .await
        .unwrap();
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 1);
        assert_eq!(*items[0].as_ref().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_producer_that_stops_without_a_word_ends_the_stream_in_an_error() {
        let (producer, stream) = channel::<u32>("the restore", Duration::from_secs(5));
        tokio::task::spawn_blocking(move || {
            producer.send(Ok(1)).unwrap();
            drop(producer);
        })
        .await
        .unwrap();
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 2);
        let status = items[1].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status
                .message()
                .contains("the restore stopped before its end")
        );
    }

    #[tokio::test]
    async fn a_caller_that_takes_nothing_stops_the_producer_and_learns_why() {
        let (producer, stream) = channel::<u32>("the restore", Duration::from_millis(50));
        let stopped = tokio::task::spawn_blocking(move || {
            for item in 0.. {
                if let Err(stopped) = producer.send(Ok(item)) {
                    return (item, stopped);
                }
            }
            unreachable!()
        })
        .await
        .unwrap();
        assert_eq!(
            stopped.0, CAPACITY as u32,
            "the producer stopped at a full channel"
        );
        assert!(matches!(stopped.1, Stopped::Idle(_)));
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), CAPACITY + 1);
        let status = items[CAPACITY].as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("took nothing"), "{status:?}");
    }

    #[tokio::test]
    async fn an_error_sent_is_the_last_word() {
        let (producer, stream) = channel::<u32>("test", Duration::from_secs(5));
        tokio::task::spawn_blocking(move || producer.fail(Status::not_found("gone")))
            .await
            .unwrap();
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].as_ref().unwrap_err().code(), tonic::Code::NotFound);
    }
}
