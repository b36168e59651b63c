//! Shutdown signals: the first SIGINT or SIGTERM asks for a graceful stop; a second
//! one exits the process at once.

use tokio_util::sync::CancellationToken;

/// The exit code after a second signal (128 + SIGINT), as shells report it.
const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// A token cancelled on the first signal. The task watching for signals exits the
/// process on the second one.
pub fn shutdown_token() -> std::io::Result<CancellationToken> {
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
                tracing::info!("stopping; signal again to exit at once");
                cancel.cancel();
            } else {
                tracing::warn!("second signal: exiting at once");
                std::process::exit(EXIT_ON_SECOND_SIGNAL);
            }
        }
    });
    Ok(token)
}
