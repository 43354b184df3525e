//! The one body type that flows through the proxy, and small helpers for
//! locally generated bodies.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Streaming body used for requests and responses on both sides.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose errors convert into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// Wraps a body and runs `on_done` exactly once: when the body ends, fails,
    /// or is dropped unfinished. Used to release per-request accounting (active
    /// request counts) only when the response has really been streamed.
    pub struct OnDone<B, F: FnOnce()> {
        #[pin]
        inner: B,
        on_done: Option<F>,
    }

    impl<B, F: FnOnce()> PinnedDrop for OnDone<B, F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(f) = this.project().on_done.take() {
                f();
            }
        }
    }
}

impl<B, F: FnOnce()> OnDone<B, F> {
    pub fn new(inner: B, on_done: F) -> Self {
        OnDone { inner, on_done: Some(on_done) }
    }
}

impl<B, F> HttpBody for OnDone<B, F>
where
    B: HttpBody,
    F: FnOnce(),
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        match &res {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.on_done.take() {
                    f();
                }
            }
            _ => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === replayable request bodies (retries and mirrors) ===

/// Request bodies up to this size are kept so that a retry or a mirror can
/// send them again (Envoy's default retry buffer). Larger bodies stream
/// through once and are neither retried after being sent nor mirrored.
pub const REPLAY_LIMIT: usize = 64 * 1024;

struct RecordState {
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<http::HeaderMap>,
    /// More than [`REPLAY_LIMIT`] went through: nothing is kept any more.
    overflow: bool,
    /// The original body has ended (fully recorded unless `overflow`).
    complete: bool,
    /// The original body while no attempt is reading it.
    source: Option<Body>,
    done: std::sync::Arc<tokio::sync::Notify>,
}

/// Records a request body as it streams to the first attempt so it can be
/// sent again. Each attempt gets a [`ReplayBody`]: it replays what was
/// recorded, then continues from the original body where the previous
/// attempt stopped.
#[derive(Clone)]
pub struct Recorder {
    state: std::sync::Arc<std::sync::Mutex<RecordState>>,
}

impl Recorder {
    pub fn new(body: Body) -> Self {
        let complete = body.is_end_stream();
        Recorder {
            state: std::sync::Arc::new(std::sync::Mutex::new(RecordState {
                chunks: Vec::new(),
                len: 0,
                trailers: None,
                overflow: false,
                complete,
                source: Some(body),
                done: std::sync::Arc::new(tokio::sync::Notify::new()),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecordState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A body for the next attempt.
    pub fn body(&self) -> Body {
        ReplayBody { rec: self.clone(), pos: 0, source: None, trailers_sent: false }.boxed_unsync()
    }

    /// Whether another attempt can send the whole body again.
    pub fn can_replay(&self) -> bool {
        let s = self.lock();
        !s.overflow && (s.complete || s.source.is_some())
    }

    /// The complete body, once the original has ended; `None` if it was too
    /// large to keep. Waits at most `wait`.
    pub async fn complete_body(&self, wait: std::time::Duration) -> Option<Body> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = {
                let s = self.lock();
                if s.overflow {
                    return None;
                }
                if s.complete {
                    let mut frames: Vec<Frame<Bytes>> = s.chunks.iter().cloned().map(Frame::data).collect();
                    if let Some(t) = s.trailers.clone() {
                        frames.push(Frame::trailers(t));
                    }
                    let stream = futures_util::stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
                    return Some(http_body_util::StreamBody::new(stream).boxed_unsync());
                }
                s.done.clone()
            };
            if tokio::time::timeout_at(deadline, notified.notified()).await.is_err() {
                return None;
            }
        }
    }
}

struct ReplayBody {
    rec: Recorder,
    pos: usize,
    source: Option<Body>,
    trailers_sent: bool,
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(src) = self.source.take() {
            self.rec.lock().source = Some(src);
        }
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.source.is_none() {
            let mut s = this.rec.lock();
            if this.pos < s.chunks.len() {
                let chunk = s.chunks[this.pos].clone();
                this.pos += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if s.complete {
                if !this.trailers_sent {
                    this.trailers_sent = true;
                    if let Some(t) = s.trailers.clone() {
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                }
                return Poll::Ready(None);
            }
            if s.overflow && this.pos > 0 {
                return Poll::Ready(Some(Err("request body too large to replay".into())));
            }
            match s.source.take() {
                Some(src) => this.source = Some(src),
                None => return Poll::Ready(Some(Err("request body is still held by a previous attempt".into()))),
            }
        }
        let Some(src) = this.source.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(src).poll_frame(cx);
        let mut s = this.rec.lock();
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflow {
                        s.len += data.len();
                        if s.len > REPLAY_LIMIT {
                            s.overflow = true;
                            s.chunks = Vec::new();
                            s.done.notify_waiters();
                        } else {
                            s.chunks.push(data.clone());
                        }
                    }
                    this.pos = s.chunks.len();
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
            }
            Poll::Ready(None) => {
                s.complete = true;
                s.done.notify_waiters();
                this.trailers_sent = true;
                drop(s);
                this.source = None;
                return polled;
            }
            _ => return polled,
        }
        // A reader that stops at the announced length never polls for the
        // end: notice it here, so mirrors and retries see a complete body.
        if this.source.as_ref().is_some_and(|src| src.is_end_stream()) {
            s.complete = true;
            s.done.notify_waiters();
            this.trailers_sent = true;
            drop(s);
            this.source = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let s = self.rec.lock();
        self.source.is_none()
            && s.complete
            && self.pos >= s.chunks.len()
            && (self.trailers_sent || s.trailers.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(chunks: Vec<&'static [u8]>) -> Body {
        let frames = chunks.into_iter().map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c))));
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    async fn read_all(mut b: Body) -> Result<Vec<u8>, BoxError> {
        let mut out = Vec::new();
        while let Some(f) = b.frame().await {
            if let Some(d) = f?.data_ref() {
                out.extend_from_slice(d);
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn replays_what_the_first_attempt_read() {
        let rec = Recorder::new(stream_of(vec![b"ab", b"cd", b"ef"]));
        assert_eq!(read_all(rec.body()).await.unwrap(), b"abcdef");
        assert!(rec.can_replay());
        assert_eq!(read_all(rec.body()).await.unwrap(), b"abcdef");
        let whole = rec.complete_body(std::time::Duration::from_secs(1)).await.unwrap();
        assert_eq!(read_all(whole).await.unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn a_later_attempt_continues_where_an_abandoned_one_stopped() {
        let rec = Recorder::new(stream_of(vec![b"ab", b"cd", b"ef"]));
        let mut first = rec.body();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.data_ref().unwrap().as_ref(), b"ab");
        drop(first);
        assert!(rec.can_replay());
        assert_eq!(read_all(rec.body()).await.unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_not_kept() {
        static BIG: [u8; REPLAY_LIMIT] = [b'x'; REPLAY_LIMIT];
        let rec = Recorder::new(stream_of(vec![&BIG, b"one more"]));
        assert_eq!(read_all(rec.body()).await.unwrap().len(), REPLAY_LIMIT + 8);
        assert!(!rec.can_replay());
        assert!(rec.complete_body(std::time::Duration::from_millis(10)).await.is_none());
    }
}

// === counting wrappers (metrics) ===

pin_project_lite::pin_project! {
    /// Counts the data bytes that pass through into a shared counter.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: HttpBody<Data = Bytes>> HttpBody for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &res
            && let Some(d) = f.data_ref()
        {
            this.count.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Counts the bytes of a response body and calls `on_finish(bytes,
    /// completed)` once: `completed` is true when the body reached its end,
    /// false when it failed or was dropped first (the client went away).
    pub struct Finished<B: HttpBody, F: FnOnce(u64, bool)> {
        #[pin]
        inner: B,
        bytes: u64,
        on_finish: Option<F>,
    }

    impl<B: HttpBody, F: FnOnce(u64, bool)> PinnedDrop for Finished<B, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(f) = this.on_finish.take() {
                // A server stops polling a body that says it has ended (an
                // empty body, or all of a known length): that is complete.
                let ended = this.inner.is_end_stream();
                f(*this.bytes, ended);
            }
        }
    }
}

impl<B: HttpBody, F: FnOnce(u64, bool)> Finished<B, F> {
    pub fn new(inner: B, on_finish: F) -> Self {
        Finished { inner, bytes: 0, on_finish: Some(on_finish) }
    }
}

impl<B, F> HttpBody for Finished<B, F>
where
    B: HttpBody<Data = Bytes>,
    F: FnOnce(u64, bool),
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    *this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.on_finish.take() {
                    f(*this.bytes, true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = this.on_finish.take() {
                    f(*this.bytes, false);
                }
            }
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
