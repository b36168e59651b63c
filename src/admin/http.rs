//! The admin API's routes, under `/admin/`, JSON in and out.
//!
//! Reads, answered by any node:
//! - `GET /admin/checkpoints[?group=G]`: every checkpoint with owner, state and lag;
//! - `GET /admin/fleet`: the fleet's status.
//!
//! Writes, carried out by the leader only (others answer 503 with `leader` and
//! `leader_url`), each needing `Authorization: Bearer TOKEN`:
//! - `POST /admin/checkpoints/reset`: a [`ResetRequest`];
//! - `POST /admin/groups/pause` and `/admin/groups/resume`: `{"group": G}`;
//! - `POST /admin/dead-letters/retry` and `/admin/dead-letters/purge`:
//!   `{"group": G, "selection": "all" | {"ids": [..]}, "dry_run": false}`.
//!
//! Errors are `{"error": "..."}` with a status that says whose move it is:
//! 400 bad request, 401 no or wrong token, 403 writes disabled, 404 nothing to act
//! on, 503 not the leader or a service unavailable, 500 anything else.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

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

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match &self {
            AdminError::NotLeader { .. } | AdminError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let (leader, leader_url) = match &self {
            AdminError::NotLeader { leader, url } => (leader.clone(), url.clone()),
            _ => (None, None),
        };
        let body = ErrorBody {
            error: self.to_string(),
            leader,
            leader_url,
        };
        let mut response = (status, Json(body)).into_response();
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

async fn reset(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Json(request): Json<ResetRequest>,
) -> Response {
    let asked = Asked::new("reset checkpoints", &request.group, request.dry_run);
    write(&admin, &headers, asked, |_| admin.reset(request)).await
}

async fn pause(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Json(request): Json<GroupRequest>,
) -> Response {
    let asked = Asked::new("pause", &request.group, false);
    let operation = |token| admin.set_paused(&request.group, true, token);
    write(&admin, &headers, asked, operation).await
}

async fn resume(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Json(request): Json<GroupRequest>,
) -> Response {
    let asked = Asked::new("resume", &request.group, false);
    let operation = |token| admin.set_paused(&request.group, false, token);
    write(&admin, &headers, asked, operation).await
}

async fn retry_dead_letters(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Json(request): Json<DeadLetterRequest>,
) -> Response {
    let asked = Asked::new("retry dead letters", &request.group, request.dry_run);
    write(&admin, &headers, asked, |_| {
        admin.retry_dead_letters(&request)
    })
    .await
}

async fn purge_dead_letters(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Json(request): Json<DeadLetterRequest>,
) -> Response {
    let asked = Asked::new("purge dead letters", &request.group, request.dry_run);
    write(&admin, &headers, asked, |_| {
        admin.purge_dead_letters(&request)
    })
    .await
}

/// What a write asks for, as it is logged and recorded.
pub(crate) struct Asked {
    pub what: String,
    pub group: String,
    pub dry_run: bool,
}

impl Asked {
    fn new(what: &str, group: &str, dry_run: bool) -> Self {
        Self {
            what: format!("{what} of group {group}"),
            group: group.to_owned(),
            dry_run,
        }
    }
}

/// Carries out a write: checks the token, then that this node leads, then runs
/// `operation` with the token's name and records the write.
async fn write<T: Serialize, F: Future<Output = Result<T, AdminError>>>(
    admin: &Admin,
    headers: &HeaderMap,
    asked: Asked,
    operation: impl FnOnce(String) -> F,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let token = match admin.auth.check(authorization) {
        Ok(token) => token,
        Err(error) => {
            tracing::warn!(what = %asked.what, %error, "refused an admin write");
            return error.into_response();
        }
    };
    if let Err(error) = admin.ensure_leader().await {
        return error.into_response();
    }
    let outcome = operation(token.clone()).await;
    let failure = outcome.as_ref().err().map(ToString::to_string);
    tracing::info!(what = %asked.what, token = %token, dry_run = asked.dry_run, error = failure.as_deref(), "admin write");
    admin.record_write(&asked, &token, failure.as_deref());
    answer(outcome)
}

fn answer<T: Serialize>(outcome: Result<T, AdminError>) -> Response {
    match outcome {
        Ok(value) => Json(value).into_response(),
        Err(error) => error.into_response(),
    }
}
