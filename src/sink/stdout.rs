//! [`StdoutSink`]: prints each event as one JSON line, in the same form as
//! `weir read` (the stored event's fields plus its `cursor`), for the embedded
//! default and for debugging.
//!
//! Writes happen on a thread of the sink's own, so a stdout that blocks (a reader
//! that stopped reading) holds up only the consumers waiting for it, and they can
//! still be stopped. A write that fails (a closed pipe, `weir run | head`) is a
//! transient failure: the consumer keeps the events and tries again with backoff,
//! never turning them into dead letters.

use std::io::Write;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::consumer::{EventProcessor, ProcessError};
use crate::event::StoredEvent;

/// A batch's lines and where to say how writing them went.
type PendingWrite = (Vec<u8>, oneshot::Sender<std::io::Result<()>>);

/// Prints events to standard output, a batch at a time.
#[derive(Debug, Default)]
pub struct StdoutSink {
    /// The writer thread's inbox, once started.
    writer: Mutex<Option<mpsc::Sender<PendingWrite>>>,
}

impl StdoutSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// The writer thread's inbox, starting the thread on first use. The thread
    /// ends when the sink is dropped.
    fn writer(&self) -> Result<mpsc::Sender<PendingWrite>, ProcessError> {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = writer.as_ref().filter(|sender| !sender.is_closed()) {
            return Ok(sender.clone());
        }
        let (sender, mut inbox) = mpsc::channel::<PendingWrite>(1);
        std::thread::Builder::new()
            .name("weir-stdout".into())
            .spawn(move || {
                while let Some((lines, done)) = inbox.blocking_recv() {
                    let mut out = std::io::stdout().lock();
                    let written = out.write_all(&lines).and_then(|()| out.flush());
                    let _ = done.send(written);
                }
            })
            .map_err(|error| {
                ProcessError::transient(
                    "stdout",
                    format!("cannot start the stdout writer: {error}"),
                )
            })?;
        *writer = Some(sender.clone());
        Ok(sender)
    }
}

/// A failed write to standard output: transient, since the consumer cannot tell
/// whether the reader comes back, and dropping events is never its answer.
fn write_error(error: &std::io::Error) -> ProcessError {
    let kind = if error.kind() == std::io::ErrorKind::BrokenPipe {
        "broken_pipe"
    } else {
        "stdout"
    };
    ProcessError::transient(kind, format!("cannot write to standard output: {error}"))
}

/// `items` as JSON lines, appended to `buffer`: what the sink and the CLI's
/// listings print.
pub fn json_lines<T: Serialize>(items: &[T], buffer: &mut Vec<u8>) -> serde_json::Result<()> {
    for item in items {
        serde_json::to_writer(&mut *buffer, item)?;
        buffer.push(b'\n');
    }
    Ok(())
}

/// The batch as JSON lines.
fn render(events: &[StoredEvent]) -> Result<Vec<u8>, ProcessError> {
    let mut buffer = Vec::with_capacity(events.len() * 256);
    json_lines(events, &mut buffer).map_err(|error| ProcessError::new("encode", error))?;
    Ok(buffer)
}

#[async_trait]
impl EventProcessor for StdoutSink {
    async fn process(&self, events: &[StoredEvent]) -> Result<(), ProcessError> {
        let started = std::time::Instant::now();
        let buffer = render(events)?;
        // One write per batch, by one thread, so lines of concurrent consumers
        // never interleave.
        let (done, written) = oneshot::channel();
        let gone = || ProcessError::transient("stdout", "the stdout writer stopped");
        self.writer()?
            .send((buffer, done))
            .await
            .map_err(|_| gone())?;
        written
            .await
            .map_err(|_| gone())?
            .map_err(|error| write_error(&error))?;
        crate::metrics::sink_batch("stdout", events.len(), started.elapsed());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_transient() {
        let error = write_error(&std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(error.is_transient(), "{error}");
        assert_eq!(error.kind(), "broken_pipe");
        let error = write_error(&std::io::Error::other("disk full"));
        assert!(error.is_transient(), "{error}");
    }

    #[tokio::test]
    async fn renders_the_lines_weir_read_prints() {
        let events = crate::consumer::testing::events(2).await;
        let rendered = String::from_utf8(render(&events).unwrap()).unwrap();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["id"], events[0].id.to_string());
        assert_eq!(first["cursor"], events[0].cursor.to_string());
        assert_eq!(first["payload"], events[0].payload);
        assert_eq!(
            serde_json::from_str::<StoredEvent>(lines[1]).unwrap(),
            events[1]
        );
    }
}
