//! Shutdown signals: the first SIGINT or SIGTERM asks for a graceful stop; a second
//! one exits the process at once.
//!
//! A graceful stop is bounded: if the process is still running `bound` after the
//! first signal (a write to a stuck stdout, a task that ignores cancellation), a
//! watchdog thread exits it. The watchdog is a plain thread, not a task, so that a
//! runtime whose workers are all blocked cannot hold it up.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The exit code after a second signal (128 + SIGINT), as shells report it.
const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// The exit code when a graceful stop overran its bound.
const EXIT_ON_OVERRUN: i32 = 1;

/// How long stopping may take beyond the consumers' grace period: leaving the
/// fleet, releasing leadership and closing the HTTP server.
pub const STOP_MARGIN: Duration = Duration::from_secs(5);

/// A token cancelled on the first signal. The task watching for signals exits the
/// process on the second one, and a watchdog exits it if it is still running
/// `bound` after the first.
pub fn shutdown_token(bound: Duration) -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let cancel = token.clone();
    // Lives as long as the process by design: it is what ends it on a second signal.
    tokio::spawn(async move {
        for signals in 1.. {
            #[cfg(unix)]
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            if signals == 1 {
                // Act first, then log: nothing that logging does may keep the
                // node from stopping.
                cancel.cancel();
                start_watchdog(bound);
                tracing::info!("stopping; signal again to exit at once");
            } else {
                tracing::warn!("second signal: exiting at once");
                std::process::exit(EXIT_ON_SECOND_SIGNAL);
            }
        }
    });
    Ok(token)
}

/// Exits the process if it is still running `bound` from now.
fn start_watchdog(bound: Duration) {
    let started = std::thread::Builder::new()
        .name("weir-stop-watchdog".into())
        .spawn(move || {
            std::thread::sleep(bound);
            tracing::error!(
                ?bound,
                "stopping took longer than the shutdown grace period allows; exiting now"
            );
            std::process::exit(EXIT_ON_OVERRUN);
        });
    if let Err(error) = started {
        tracing::warn!(%error, "cannot start the shutdown watchdog; stopping without a bound");
    }
}
