//! The one way a bridge reads a request body: as JSON, within `max_request_bytes`, and a body
//! that is not what the route takes is refused in the caller's API's shape, saying what to fix:
//! 413 naming the limit for one that is too large, 400 for one that is not the right JSON.

use axum::Json;
use axum::extract::{FromRequest, Request};
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::{Api, ApiError, HttpState};

/// A request body read as JSON; rejected with an [`ApiError`].
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<HttpState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &HttpState) -> Result<Self, ApiError> {
        let path = request.uri().path().to_owned();
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(refusal(Api::of(&path), &path, &rejection, state.inference.max_request_bytes())),
        }
    }
}

fn refusal(api: Api, path: &str, rejection: &JsonRejection, max_bytes: usize) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            api,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than this phi3d accepts: at most {max_bytes} bytes (max_request_bytes)"),
        );
    }
    ApiError::new(api, StatusCode::BAD_REQUEST, format!("the request body is not a valid request for {path}: {}", rejection.body_text()))
}
