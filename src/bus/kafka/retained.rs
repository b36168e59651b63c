//! Reading what the decisions topic retains: every partition from its beginning
//! up to where it ended when the read started, keeping the newest decision of
//! every group.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{
    BTreeMap, Decision, DecisionReader, DropOffRuntime, Error, Frame, Inner, RETAINED_TIMEOUT,
    Result, decode_frame, delta_key,
};

impl Inner {
    /// The newest complete decision per group in the decisions topic, read from
    /// the beginning up to where each partition ended when the read started.
    pub(super) fn read_retained(&self, deadline: Instant) -> Result<Vec<Decision>> {
        let topic = self.decisions_topic.as_str();
        let consumer: BaseConsumer = self.consumer()?;
        let consumer = DropOffRuntime::new(consumer);
        // partition -> offset the read must reach
        let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
        let mut assignment = TopicPartitionList::new();
        for (partition, low, high) in self.watermarks(&*consumer, topic)? {
            if high > low {
                remaining.insert(partition, high);
                assignment
                    .add_partition_offset(topic, partition, Offset::Beginning)
                    .map_err(|error| self.read_error(topic, error))?;
            }
        }
        let mut reader = DecisionReader::new();
        if remaining.is_empty() {
            return Ok(Vec::new());
        }
        consumer
            .assign(&assignment)
            .map_err(|error| self.read_error(topic, error))?;
        while !remaining.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Unavailable(format!(
                    "reading the retained decisions from Kafka topic {topic:?} at {} took longer than {} s",
                    self.kafka.brokers,
                    RETAINED_TIMEOUT.as_secs()
                )));
            }
            match consumer.poll(left.min(Duration::from_millis(200))) {
                Some(Ok(message)) => {
                    let partition = message.partition();
                    if remaining
                        .get(&partition)
                        .is_some_and(|&high| message.offset() + 1 >= high)
                    {
                        remaining.remove(&partition);
                    }
                    self.records_read.fetch_add(1, Ordering::Relaxed);
                    self.take_record(&message, &mut reader);
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, topic, "reading retained decisions: retrying");
                }
                None => {
                    // Records below the high watermark may be gone (compacted or
                    // past retention): the position says how far the read got.
                    if let Ok(positions) = consumer.position() {
                        for element in positions.elements() {
                            if let Offset::Offset(at) = element.offset()
                                && remaining
                                    .get(&element.partition())
                                    .is_some_and(|&high| at >= high)
                            {
                                remaining.remove(&element.partition());
                            }
                        }
                    }
                }
            }
        }
        Ok(reader.into_decisions())
    }

    /// Adds one record of a retained read to what was read.
    fn take_record(
        &self,
        message: &rdkafka::message::BorrowedMessage<'_>,
        reader: &mut DecisionReader,
    ) {
        // A tombstone: a part key that a newer decision no longer uses.
        let Some(payload) = message.payload() else {
            return;
        };
        match decode_frame(payload) {
            Ok(Frame::Decision(part)) => {
                self.saw_parts(&part.decision.group, part.parts);
                reader.push(Frame::Decision(part));
            }
            Ok(Frame::Delta(delta)) => {
                let key = delta_key(&delta.group, delta.version());
                self.lock_written()
                    .entry(delta.group.clone())
                    .or_default()
                    .delta_keys
                    .insert(key);
                reader.push(Frame::Delta(delta));
            }
            Ok(Frame::Signal(_) | Frame::Digest(_)) => {
                tracing::debug!(topic = %self.decisions_topic, "ignored a signal in the decisions topic");
            }
            Err(error) => {
                self.count_invalid();
                tracing::warn!(
                    %error, topic = %self.decisions_topic, partition = message.partition(),
                    offset = message.offset(), "skipped a decisions record that cannot be read"
                );
            }
        }
    }
}
