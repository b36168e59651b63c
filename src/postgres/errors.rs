//! Driver errors as the store's error kinds, with failed connections explained.

use super::tls::{self, TlsContext};
use crate::store::Error;

/// Maps a failed connection attempt onto the store's error kinds: unavailable,
/// with TLS failures explained (what went wrong, which setting to change).
pub(crate) fn connect_failed(error: tokio_postgres::Error, context: &TlsContext) -> Error {
    if let Some(db) = error.as_db_error() {
        if db.code() == &tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS {
            return Error::Unavailable(format!(
                "{} refuses new connections ({}): all of its max_connections are taken; raise max_connections on the server, or lower [store] pool_size or the number of nodes and other clients (a node opens at most pool_size + 1; see docs/postgres-in-production.md)",
                context.hosts,
                db.message()
            ));
        }
    }
    match tls::explain(&error, context) {
        Some(reason) => Error::Unavailable(reason),
        None => classify(error),
    }
}

/// Maps a driver error onto the store's error kinds.
pub(crate) fn classify(error: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    let Some(db) = error.as_db_error() else {
        // No server error: the connection failed or was lost.
        return Error::Unavailable(error.to_string());
    };
    let code = db.code();
    if [
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_FUNCTION,
        SqlState::INVALID_SCHEMA_NAME,
    ]
    .contains(code)
    {
        return Error::Backend(format!(
            "{}: the schema looks unmigrated, run `weir migrate`",
            db.message()
        ));
    }
    if [
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::TOO_MANY_CONNECTIONS,
        SqlState::CONNECTION_EXCEPTION,
        SqlState::CONNECTION_FAILURE,
    ]
    .contains(code)
    {
        return Error::Unavailable(db.message().to_owned());
    }
    let constraint = db
        .constraint()
        .map(|c| format!(" (constraint {c})"))
        .unwrap_or_default();
    Error::Backend(format!("{}{constraint}", db.message()))
}
