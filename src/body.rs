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
            }
            _ => {}
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
