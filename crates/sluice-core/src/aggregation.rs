//! How a meter aggregates the values of its events.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A meter's aggregation. Parsed at the API edge and when a meter is read
/// from the store: an unknown name is an error, never a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Sum of the values.
    Sum,
    /// Number of events.
    Count,
    /// Number of distinct values.
    UniqueCount,
    /// Largest value.
    Max,
    /// Smallest value.
    Min,
    /// The value of the latest event (by event time).
    Latest,
}

impl Aggregation {
    /// Every aggregation, in the order the docs list them.
    pub const ALL: [Aggregation; 6] =
        [Aggregation::Sum, Aggregation::Count, Aggregation::UniqueCount, Aggregation::Max, Aggregation::Min, Aggregation::Latest];

    /// The name used in the API and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Count => "count",
            Aggregation::UniqueCount => "unique_count",
            Aggregation::Max => "max",
            Aggregation::Min => "min",
            Aggregation::Latest => "latest",
        }
    }

    /// True when the events' values are read (all but `count`).
    pub fn reads_values(self) -> bool {
        self != Aggregation::Count
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An aggregation name that is not one of [`Aggregation::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an aggregation; one of sum, count, unique_count, max, min, latest")]
pub struct UnknownAggregation(pub String);

impl FromStr for Aggregation {
    type Err = UnknownAggregation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Aggregation::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| UnknownAggregation(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_an_error() {
        for a in Aggregation::ALL {
            assert_eq!(a.as_str().parse::<Aggregation>(), Ok(a));
            assert_eq!(serde_json::to_value(a).ok(), Some(serde_json::Value::String(a.as_str().into())));
        }
        assert!("average".parse::<Aggregation>().is_err());
        assert!("Sum".parse::<Aggregation>().is_err());
    }
}
