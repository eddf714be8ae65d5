//! Counts gRPC requests for `phi3d_requests_total`, as a tower layer around every service.
//!
//! The code is the one the response starts with: an error before the stream (INVALID_ARGUMENT,
//! RESOURCE_EXHAUSTED, …) comes back as a trailers-only response whose headers carry it; a
//! stream that starts counts as `Ok`. Codes are written as tonic names them (`Ok`,
//! `InvalidArgument`, `ResourceExhausted`).

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::codegen::http;

use super::Metrics;

/// The services whose methods are counted by name; any other path counts as `other`, so that
/// a client cannot grow the label set at will.
const KNOWN_SERVICES: [&str; 4] = ["/phi3d.v1.", "/grpc.health.v1.", "/grpc.reflection.v1.", "/grpc.reflection.v1alpha."];

#[derive(Clone)]
pub struct CountRequests {
    pub metrics: Metrics,
}

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, Body, ResponseBody> tower::Service<http::Request<Body>> for Counted<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let method = if KNOWN_SERVICES.iter().any(|service| path.starts_with(service)) { path.to_owned() } else { "other".into() };
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from_i32);
            // A method no service has is not worth a label of its own either.
            let method = if code == tonic::Code::Unimplemented { "other".into() } else { method };
            metrics.request("grpc", &method, &format!("{code:?}"));
            Ok(response)
        })
    }
}
