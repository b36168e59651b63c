//! The admin API's routes, under `/admin/`, JSON in and out.
//!
//! Reads, answered by any node:
//! - `GET /admin/checkpoints[?group=G]`: every checkpoint with owner, state and lag;
//! - `GET /admin/fleet`: the fleet's status.
//!
//! Writes, carried out by the leader only (others answer 503 with `leader` and
//! `leader_url`), each needing `Authorization: Bearer TOKEN`:
//! - `POST /admin/checkpoints/reset`: a [`ResetRequest`]; `202` with an
//!   [`InProgress`](super::requests::InProgress) body while it runs on;
//! - `POST /admin/groups/pause` and `/admin/groups/resume`: `{"group": G,
//!   "create": false}`;
//! - `POST /admin/dead-letters/retry` and `/admin/dead-letters/purge`:
//!   `{"group": G, "selection": "all" | {"ids": [..]}, "dry_run": false}`.
//!
//! A body with a field the request does not know is refused (400, naming the
//! field), before anything is done.
//!
//! Errors are `{"error": "..."}` with a status that says whose move it is:
//! 400 bad request, 401 no or wrong token, 403 writes disabled (or a tokenless
//! write for another `Host`), 404 nothing to act on, 409 a reset of the group
//! already in progress, 503 not the leader or a service unavailable, 500
//! anything else.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::audit::{Audit, selection};
use super::{Admin, AdminError, GroupRequest, ResetRequest};
use crate::consumer::replay::DeadLetterRequest;

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// On a 503 from a node that does not lead: who does, and where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_url: Option<String>,
}

impl AdminError {
    /// The HTTP status that says whose move it is.
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::NotLeader { .. } | AdminError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body of its answer.
    pub fn body(&self) -> ErrorBody {
        let (leader, leader_url) = match self {
            AdminError::NotLeader { leader, url } => (leader.clone(), url.clone()),
            _ => (None, None),
        };
        ErrorBody {
            error: self.to_string(),
            leader,
            leader_url,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// The admin routes, to merge beside the node's other endpoints.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/admin/checkpoints", get(checkpoints))
        .route("/admin/fleet", get(fleet))
        .route("/admin/checkpoints/reset", post(reset))
        .route("/admin/groups/pause", post(pause))
        .route("/admin/groups/resume", post(resume))
        .route("/admin/dead-letters/retry", post(retry_dead_letters))
        .route("/admin/dead-letters/purge", post(purge_dead_letters))
        .with_state(admin)
}

#[derive(Debug, Deserialize)]
struct GroupQuery {
    group: Option<String>,
}

async fn checkpoints(State(admin): State<Arc<Admin>>, Query(query): Query<GroupQuery>) -> Response {
    answer(admin.checkpoints(query.group.as_deref()).await)
}

async fn fleet(State(admin): State<Arc<Admin>>) -> Response {
    answer(admin.fleet_status().await)
}

async fn reset(State(admin): State<Arc<Admin>>, headers: HeaderMap, body: Bytes) -> Response {
    let (request, token): (ResetRequest, _) = match authorized(&admin, &headers, &body).await {
        Ok(asked) => asked,
        Err(refused) => return refused,
    };
    let (status, answer) = admin.reset_for(request, &token).await;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(answer)).into_response()
}

async fn pause(State(admin): State<Arc<Admin>>, headers: HeaderMap, body: Bytes) -> Response {
    let admin = admin.as_ref();
    write(admin, &headers, &body, |request: GroupRequest, token| {
        let audit = Audit::new("pause", &request.group, &token, false);
        (audit, async move {
            admin.set_paused(&request, true, token).await
        })
    })
    .await
}

async fn resume(State(admin): State<Arc<Admin>>, headers: HeaderMap, body: Bytes) -> Response {
    let admin = admin.as_ref();
    write(admin, &headers, &body, |request: GroupRequest, token| {
        let audit = Audit::new("resume", &request.group, &token, false);
        (audit, async move {
            admin.set_paused(&request, false, token).await
        })
    })
    .await
}

async fn retry_dead_letters(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let admin = admin.as_ref();
    dead_letter_write(
        admin,
        &headers,
        &body,
        "retry dead letters",
        |request| async move { admin.retry_dead_letters(&request).await },
    )
    .await
}

async fn purge_dead_letters(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let admin = admin.as_ref();
    dead_letter_write(
        admin,
        &headers,
        &body,
        "purge dead letters",
        |request| async move { admin.purge_dead_letters(&request).await },
    )
    .await
}

/// A retry or purge of dead letters, recorded with the letters it chose.
async fn dead_letter_write<T: Serialize, F: Future<Output = Result<T, AdminError>>>(
    admin: &Admin,
    headers: &HeaderMap,
    body: &[u8],
    what: &str,
    operation: impl FnOnce(DeadLetterRequest) -> F,
) -> Response {
    write(admin, headers, body, |request: DeadLetterRequest, token| {
        let audit = Audit::new(what, &request.group, &token, request.dry_run)
            .target(selection(&request.selection));
        (audit, operation(request))
    })
    .await
}

/// A request body as `T`. Every admin request refuses fields it does not know,
/// and the answer names the field: a misspelt `dryRun` must be an error, never a
/// real run.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|error| {
        AdminError::BadRequest(format!(
            "the request body is not one this endpoint takes: {error}; nothing was changed (see docs/operating.md for each request's fields)"
        ))
    })
}

/// Checks a write's token, reads its body as `R`, and checks that this node
/// leads; the request and the token's name, or the answer that refuses it.
async fn authorized<R: DeserializeOwned>(
    admin: &Admin,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(R, String), Response> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok());
    let token = admin.auth.check(authorization, host).map_err(|error| {
        tracing::warn!(%error, "refused an admin write");
        error.into_response()
    })?;
    let request: R = parse_body(body).map_err(|error| {
        tracing::warn!(token = %token, %error, "refused an admin write");
        error.into_response()
    })?;
    admin
        .ensure_leader()
        .await
        .map_err(IntoResponse::into_response)?;
    Ok((request, token))
}

/// Carries out a write once [`authorized`]: runs the operation `start` makes of
/// the request and the token's name, and records the write.
async fn write<R, T, F>(
    admin: &Admin,
    headers: &HeaderMap,
    body: &[u8],
    start: impl FnOnce(R, String) -> (Audit, F),
) -> Response
where
    R: DeserializeOwned,
    T: Serialize,
    F: Future<Output = Result<T, AdminError>>,
{
    let (request, token) = match authorized(admin, headers, body).await {
        Ok(asked) => asked,
        Err(refused) => return refused,
    };
    let (audit, operation) = start(request, token);
    let outcome = operation.await;
    let failure = outcome.as_ref().err().map(ToString::to_string);
    tracing::info!(what = %audit.what, token = %audit.token, dry_run = audit.dry_run, error = failure.as_deref(), "admin write");
    let answered = outcome
        .as_ref()
        .ok()
        .and_then(|v| serde_json::to_value(v).ok());
    admin
        .journal
        .record(audit.event(failure.as_deref().unwrap_or("done"), answered.as_ref()));
    answer(outcome)
}

fn answer<T: Serialize>(outcome: Result<T, AdminError>) -> Response {
    match outcome {
        Ok(value) => Json(value).into_response(),
        Err(error) => error.into_response(),
    }
}
