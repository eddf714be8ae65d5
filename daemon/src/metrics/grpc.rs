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

/// The methods counted by name; any other path counts as `other`, whatever its answer (an
/// unknown method under a known service is refused by the token check before tonic can say
/// UNIMPLEMENTED), so that a client cannot grow the label set at will. A test checks the list
/// against the proto.
const KNOWN_METHODS: [&str; 10] = [
    "/phi3d.v1.Inference/Chat",
    "/phi3d.v1.Inference/Complete",
    "/phi3d.v1.Inference/Tokenize",
    "/phi3d.v1.Inference/Cancel",
    "/phi3d.v1.Admin/GetStatus",
    "/phi3d.v1.Admin/ListTools",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

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
        let method = KNOWN_METHODS.iter().find(|method| **method == path).copied().unwrap_or("other");
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
            metrics.request("grpc", method, &format!("{code:?}"));
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::KNOWN_METHODS;

    #[test]
    fn every_phi3d_method_in_the_proto_is_counted_by_name() {
        let proto = include_str!("../../../proto/phi3d/v1/phi3d.proto");
        let mut service = "";
        let mut methods = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                methods.push(format!("/phi3d.v1.{service}/{}", rest.split('(').next().unwrap().trim()));
            }
        }
        assert_eq!(methods.len(), 6, "{methods:?}");
        for method in methods {
            assert!(KNOWN_METHODS.contains(&method.as_str()), "{method} is missing from KNOWN_METHODS");
        }
    }
}
