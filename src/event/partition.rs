//! Slices and partitions: how one category (or the log) is spread over a fleet
//! while each stream stays in order.
//!
//! Every event belongs to one of [`SLICES`] slices, a hash of its stream's name,
//! so all events of a stream share a slice. A [`Partition`] is a contiguous range
//! of slices: partition `i` of `n` (`n` from 1 to [`SLICES`]) holds slices
//! `i * SLICES / n .. (i + 1) * SLICES / n`, rounded down. A power of two splits
//! evenly; other counts give partitions that differ by at most one slice. Its
//! text form, appended to a source, is `@i/n`: `category:orders@3/16`, `log@0/4`.
//!
//! The slice function is part of weir's storage format and must never change: the
//! Postgres store computes the same value in SQL when it writes a row, and
//! partition checkpoints are only meaningful while it holds. It is the top 10 bits
//! of the MD5 digest of the stream name's UTF-8 bytes, in SQL
//! `(('x' || substr(md5(stream), 1, 4))::bit(16)::integer >> 6)`. MD5 is used for
//! its stable, well-mixed bits, not for security.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use md5::{Digest, Md5};

/// How many slices every category (and the log) is divided into.
pub const SLICES: u16 = 1024;

/// The slice of every event of the stream named `stream` (the stream's id within
/// its category, e.g. `order-42`).
pub fn slice_of(stream: &str) -> u16 {
    let digest = Md5::digest(stream.as_bytes());
    u16::from_be_bytes([digest[0], digest[1]]) >> 6
}

/// Partition `index` of `count`: a contiguous range of slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition {
    index: u16,
    count: u16,
}

/// Why a partition is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartitionError {
    #[error("a category or the log splits into 1 to {SLICES} partitions, not {0}")]
    Count(u32),
    #[error("partition {index} does not exist among {count} (they are numbered 0 to {last})", last = count - 1)]
    Index { index: u32, count: u32 },
    #[error("a partition is written INDEX/COUNT, e.g. 3/16")]
    Syntax,
}

impl Partition {
    /// Partition `index` of `count`.
    pub fn new(index: u32, count: u32) -> Result<Self, PartitionError> {
        check_count(count)?;
        if index >= count {
            return Err(PartitionError::Index { index, count });
        }
        // Both fit: count <= SLICES.
        Ok(Self {
            index: index as u16,
            count: count as u16,
        })
    }

    /// Every partition of a split into `count`, in order.
    pub fn all(count: u32) -> Result<impl Iterator<Item = Partition>, PartitionError> {
        check_count(count)?;
        Ok((0..count as u16).map(move |index| Partition {
            index,
            count: count as u16,
        }))
    }

    /// The partition of `count` that holds `slice`.
    pub fn holding(slice: u16, count: u32) -> Result<Self, PartitionError> {
        check_count(count)?;
        // The i with start(i) <= slice < start(i + 1), start(i) = i * SLICES / count.
        let slice = u32::from(slice.min(SLICES - 1));
        let index = ((slice + 1) * count - 1) / u32::from(SLICES);
        Ok(Self {
            index: index as u16,
            count: count as u16,
        })
    }

    pub fn index(self) -> u32 {
        u32::from(self.index)
    }

    pub fn count(self) -> u32 {
        u32::from(self.count)
    }

    /// The slices it holds.
    pub fn slices(self) -> Range<u16> {
        let start = |index: u16| {
            let slice = u32::from(index) * u32::from(SLICES) / u32::from(self.count);
            slice as u16
        };
        start(self.index)..start(self.index + 1)
    }

    /// Whether events of `slice` belong to it.
    pub fn holds(self, slice: u16) -> bool {
        self.slices().contains(&slice)
    }

    /// Whether the two share a slice.
    pub fn overlaps(self, other: Partition) -> bool {
        let (a, b) = (self.slices(), other.slices());
        a.start < b.end && b.start < a.end
    }
}

fn check_count(count: u32) -> Result<(), PartitionError> {
    if count == 0 || count > u32::from(SLICES) {
        return Err(PartitionError::Count(count));
    }
    Ok(())
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Partition {
    type Err = PartitionError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (index, count) = text.split_once('/').ok_or(PartitionError::Syntax)?;
        let number = |part: &str| {
            // Canonical digits only, so that each partition has one text form.
            if part.is_empty() || (part.len() > 1 && part.starts_with('0')) {
                return Err(PartitionError::Syntax);
            }
            part.parse::<u32>().map_err(|_| PartitionError::Syntax)
        };
        Partition::new(number(index)?, number(count)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed values: if this test fails, the slice function changed, and every
    /// partition checkpoint of every deployed store would silently point at other
    /// events. Never update these values; the function must not change.
    #[test]
    fn the_slice_function_never_changes() {
        let expected: &[(&str, u16)] = &[
            ("", 848),
            ("order-42", 317),
            ("order-43", 603),
            ("1", 787),
            ("customer/7", 112),
            ("é", 411),
            (
                "a-very-long-stream-name-with-many-characters-0123456789",
                579,
            ),
        ];
        for &(stream, slice) in expected {
            assert_eq!(slice_of(stream), slice, "slice of {stream:?}");
        }
    }

    #[test]
    fn slices_spread_evenly() {
        let mut counts = vec![0u32; usize::from(SLICES)];
        for i in 0..102_400 {
            counts[usize::from(slice_of(&format!("stream-{i}")))] += 1;
        }
        // 100 per slice on average; a decent hash keeps every slice near it.
        assert!(
            counts.iter().all(|&n| (50..=160).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn partitions_cover_every_slice_once() {
        for count in [1, 2, 3, 4, 12, 16, 100, 1000, 1024] {
            let mut covered = vec![0; usize::from(SLICES)];
            for partition in Partition::all(count).unwrap() {
                for slice in partition.slices() {
                    covered[usize::from(slice)] += 1;
                    assert_eq!(Partition::holding(slice, count).unwrap(), partition);
                }
            }
            assert!(covered.iter().all(|&n| n == 1), "count {count}");
        }
    }

    #[test]
    fn text_forms_round_trip_and_bad_ones_are_refused() {
        let partition: Partition = "3/16".parse().unwrap();
        assert_eq!(partition.slices(), 192..256);
        assert_eq!(partition.to_string(), "3/16");
        let twelfth: Partition = "1/12".parse().unwrap();
        assert_eq!(twelfth.slices(), 85..170);
        for bad in ["3", "16/16", "0/0", "0/1025", "03/16", "a/b", "-1/4", "1/"] {
            assert!(bad.parse::<Partition>().is_err(), "{bad}");
        }
    }

    #[test]
    fn overlapping_partitions_of_different_counts() {
        let half: Partition = "1/2".parse().unwrap();
        let quarter: Partition = "2/4".parse().unwrap();
        let other: Partition = "1/4".parse().unwrap();
        assert!(half.overlaps(quarter) && quarter.overlaps(half));
        assert!(!half.overlaps(other));
    }
}
