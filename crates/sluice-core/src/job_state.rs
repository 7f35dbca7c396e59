//! The states of a durable job.

crate::named_enum! {
    /// Where a job is in its life: `queued` → `running` → `succeeded`, `failed`
    /// or `cancelled` (a retry or a failed attempt with attempts left goes back
    /// to `queued`). Stored and shown by these names.
    pub enum JobState / UnknownJobState ("a job status") {
        /// Waiting to be claimed (also between attempts).
        Queued = "queued",
        /// Claimed by a runner, under a lease.
        Running = "running",
        /// Ended well; has a result.
        Succeeded = "succeeded",
        /// Ended badly after its last attempt (or a permanent error).
        Failed = "failed",
        /// Cancelled before or while running.
        Cancelled = "cancelled",
    }
}

impl JobState {
    /// True once the job will not change any more (until a retry).
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// Compares with a state's name (`state == "running"`), as tests and logs
/// read it.
impl PartialEq<&str> for JobState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(s));
            assert_eq!(serde_json::to_value(s).ok(), Some(serde_json::Value::String(s.as_str().into())));
        }
        assert!("done".parse::<JobState>().is_err());
        assert!(JobState::Cancelled.is_terminal() && !JobState::Queued.is_terminal());
    }
}
