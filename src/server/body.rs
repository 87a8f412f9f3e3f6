//! Reading a request body within bounds: its size, the time it may take, and a share of the
//! engine-wide budget of body bytes held in memory.
//!
//! The budget is taken chunk by chunk as bytes arrive, not up front from `Content-Length`:
//! a peer that declares a megabyte and trickles it holds only what it has sent, so a few
//! hundred slow uploads cannot reserve the whole budget and lock out real webhooks (which
//! arrive whole in one or two chunks). When the budget is spent, the request is answered 503
//! with `Retry-After` and its bytes are released at once.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a body was not read.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// Over the source's size limit (413).
    TooLarge(usize),
    /// Not complete within the body timeout (408).
    TooSlow(Duration),
    /// The engine holds as many body bytes as it allows (503).
    Busy,
    /// The peer broke off or sent a malformed body (400).
    Broken,
}

/// A body read whole, with the share of the budget it holds until dropped.
pub struct ReadBody {
    pub bytes: Bytes,
    _held: Option<OwnedSemaphorePermit>,
}

/// Reads `body` up to `max` bytes within `timeout`, taking its bytes from `budget`.
pub async fn read(
    body: Body,
    max: usize,
    budget: &Arc<Semaphore>,
    timeout: Duration,
) -> Result<ReadBody, BodyError> {
    match tokio::time::timeout(timeout, read_inner(body, max, budget)).await {
        Ok(r) => r,
        Err(_) => Err(BodyError::TooSlow(timeout)),
    }
}

async fn read_inner(
    mut body: Body,
    max: usize,
    budget: &Arc<Semaphore>,
) -> Result<ReadBody, BodyError> {
    let mut held: Option<OwnedSemaphorePermit> = None;
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyError::Broken)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if data.is_empty() {
            continue;
        }
        len = len.saturating_add(data.len());
        if len > max {
            return Err(BodyError::TooLarge(max));
        }
        let n = u32::try_from(data.len()).map_err(|_| BodyError::TooLarge(max))?;
        let permit = budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| BodyError::Busy)?;
        match &mut held {
            Some(h) => h.merge(permit),
            None => held = Some(permit),
        }
        // The usual body arrives in one chunk: keep it as it is, without a copy.
        match &first {
            None => first = Some(data),
            Some(f) => {
                if rest.is_empty() {
                    rest.reserve(len);
                    rest.extend_from_slice(f);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    let bytes = if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        Bytes::from(rest)
    };
    Ok(ReadBody { bytes, _held: held })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_take_and_give_back_their_bytes() {
        let budget = Arc::new(Semaphore::new(100));
        let t = Duration::from_secs(1);
        let a = read(Body::from(vec![1u8; 60]), 1000, &budget, t)
            .await
            .ok()
            .unwrap();
        assert_eq!(budget.available_permits(), 40);
        assert_eq!(
            read(Body::from(vec![1u8; 60]), 1000, &budget, t)
                .await
                .err(),
            Some(BodyError::Busy)
        );
        assert_eq!(
            budget.available_permits(),
            40,
            "a refused body holds nothing"
        );
        drop(a);
        assert_eq!(budget.available_permits(), 100);
        assert_eq!(
            read(Body::from(vec![1u8; 60]), 50, &budget, t).await.err(),
            Some(BodyError::TooLarge(50))
        );
        let chunks = futures_util::stream::iter(
            [b"ab".to_vec(), b"cd".to_vec(), b"e".to_vec()]
                .into_iter()
                .map(Ok::<_, std::io::Error>),
        );
        let r = read(Body::from_stream(chunks), 1000, &budget, t)
            .await
            .ok()
            .unwrap();
        assert_eq!(&r.bytes[..], b"abcde");
    }
}
