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
