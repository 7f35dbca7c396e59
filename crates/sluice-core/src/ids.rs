//! Validated identifiers. Parse, don't validate: once a value of these types
//! exists it is known to be well formed.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a value was refused as an identifier. The message is written for the
/// API client and is returned verbatim in validation errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdError(pub String);

/// Maximum length of an event id, in characters.
pub const MAX_EVENT_ID_CHARS: usize = 128;
/// Maximum length of an event type.
pub const MAX_EVENT_TYPE_LEN: usize = 128;

/// Checks text that is stored as a key or column value by every state
/// store (customer, user, subscription, group and alias ids, trait and
/// attribute keys): no NUL character, which PostgreSQL's `text` cannot
/// hold. Every other character (line breaks included: a quoted CSV field
/// may hold one) is stored by both backends, as the store's conformance
/// suite checks with a property test.
pub fn check_storable(s: &str) -> Result<(), IdError> {
    match s.find('\0') {
        None => Ok(()),
        Some(at) => Err(IdError(format!("must not contain NUL (U+0000, at byte {at}): the state store cannot hold it"))),
    }
}

/// The idempotency key of an event: 1–128 characters, unique per workspace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(String);

impl EventId {
    /// An id known to be valid (`csv_` + 32 hex digits, decoded from a batch
    /// record): no check.
    pub(crate) fn trusted(s: String) -> Self {
        debug_assert!(Self::parse(s.as_str()).is_ok());
        EventId(s)
    }

    /// Accepts any non-empty string of at most 128 characters without control characters.
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        if s.is_empty() {
            return Err(IdError("must not be empty".into()));
        }
        let n = s.chars().count();
        if n > MAX_EVENT_ID_CHARS {
            return Err(IdError(format!("must be at most {MAX_EVENT_ID_CHARS} characters (got {n})")));
        }
        if s.chars().any(char::is_control) {
            return Err(IdError("must not contain control characters".into()));
        }
        Ok(EventId(s))
    }

    /// A fresh, time-ordered id (UUIDv7) for events sent without one.
    pub fn generate() -> Self {
        EventId(uuid::Uuid::now_v7().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event type: 1–128 characters of `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventType(String);

impl EventType {
    /// Validates the character set and length.
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        if s.is_empty() {
            return Err(IdError("must not be empty".into()));
        }
        if s.len() > MAX_EVENT_TYPE_LEN {
            return Err(IdError(format!("must be at most {MAX_EVENT_TYPE_LEN} characters (got {})", s.len())));
        }
        if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))) {
            return Err(IdError(format!("may only contain letters, digits and _ . : - (found {c:?})")));
        }
        Ok(EventType(s))
    }

    /// An event *name* as Segment-compatible clients send it (`"Order
    /// Completed"`), used verbatim as the type: 1–128 characters, no control
    /// characters. Only the Segment-compatible endpoints use this; the native
    /// API keeps the strict character set of [`EventType::parse`].
    pub fn from_name(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        let n = s.chars().count();
        if n == 0 || n > MAX_EVENT_TYPE_LEN {
            return Err(IdError(format!("must be 1-{MAX_EVENT_TYPE_LEN} characters (got {n})")));
        }
        if s.chars().any(char::is_control) {
            return Err(IdError("must not contain control characters".into()));
        }
        Ok(EventType(s))
    }

    /// The type as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A workspace name: 1–64 characters of lowercase letters, digits, `-` and
/// `_`, starting with a letter or digit. Names are immutable and are the
/// workspace's identifier (they appear in lake paths, so they must be safe in
/// a file path and a URL).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkspaceName(String);

impl WorkspaceName {
    /// Validates a workspace name.
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        let ok_first = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let ok_rest = s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !ok_first || !ok_rest || s.len() > 64 {
            return Err(IdError("must be 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit".into()));
        }
        Ok(WorkspaceName(s))
    }

    /// The name of the workspace created on first start.
    pub fn default_workspace() -> Self {
        WorkspaceName("default".into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Read as the text it is (`&name` where a `&str` is wanted), never built
/// from one without [`WorkspaceName::parse`].
impl std::ops::Deref for WorkspaceName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkspaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn event_type_charset() {
        assert!(EventType::parse("api.call:v2-x_y").is_ok());
        assert!(EventType::parse("").is_err());
        assert!(EventType::parse("has space").is_err());
        assert!(EventType::parse("é").is_err());
        assert!(EventType::parse("a".repeat(128)).is_ok());
        assert!(EventType::parse("a".repeat(129)).is_err());
    }

    #[test]
    fn event_id_length_counts_characters() {
        assert!(EventId::parse("日".repeat(128)).is_ok());
        assert!(EventId::parse("a".repeat(129)).is_err());
        assert!(EventId::parse("").is_err());
        assert!(EventId::parse("a\nb").is_err());
    }

    #[test]
    fn storable_text_has_no_control_characters() {
        assert!(check_storable("acme 株式会社 🙂 \"quoted\" back\\slash").is_ok());
        let e = check_storable("g\u{0}").unwrap_err();
        assert!(e.0.contains("U+0000"), "{e}");
        assert!(check_storable("a\nb\u{1b}\u{7f}\u{9f}").is_ok());
    }

    #[test]
    fn workspace_names() {
        assert!(WorkspaceName::parse("acme-prod_1").is_ok());
        assert!(WorkspaceName::parse("Acme").is_err());
        assert!(WorkspaceName::parse("-x").is_err());
        assert!(WorkspaceName::parse("../x").is_err());
        assert!(WorkspaceName::parse("").is_err());
    }
}
