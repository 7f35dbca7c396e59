//! How a meter aggregates the values of its events.

crate::named_enum! {
    /// A meter's aggregation. Parsed at the API edge and when a meter is read
    /// from the store: an unknown name is an error, never a default.
    pub enum Aggregation / UnknownAggregation ("an aggregation") {
        /// Sum of the values.
        Sum = "sum",
        /// Number of events.
        Count = "count",
        /// Number of distinct values.
        UniqueCount = "unique_count",
        /// Largest value.
        Max = "max",
        /// Smallest value.
        Min = "min",
        /// The value of the latest event (by event time).
        Latest = "latest",
    }
}

impl Aggregation {
    /// True when the events' values are read (all but `count`).
    pub fn reads_values(self) -> bool {
        self != Aggregation::Count
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
