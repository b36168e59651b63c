//! [`StdoutSink`]: prints each event as one JSON line, in the same form as
//! `weir read` (the stored event's fields plus its `cursor`), for the embedded
//! default and for debugging.

use std::io::Write;

use async_trait::async_trait;
use serde::Serialize;

use crate::consumer::{EventProcessor, ProcessError};
use crate::event::StoredEvent;

/// Prints events to standard output, a batch at a time.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl StdoutSink {
    pub fn new() -> Self {
        Self
    }
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
        // One write per batch, under the lock, so lines of concurrent consumers
        // never interleave.
        let mut out = std::io::stdout().lock();
        out.write_all(&buffer)
            .and_then(|()| out.flush())
            .map_err(|error| {
                ProcessError::new(
                    "stdout",
                    format!("cannot write to standard output: {error}"),
                )
            })?;
        crate::metrics::sink_batch("stdout", events.len(), started.elapsed());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
