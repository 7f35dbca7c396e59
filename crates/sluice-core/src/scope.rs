//! Key scopes and what each may do.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a key may do. Ordered from least to most powerful, but permissions
/// are not a simple ladder: an `ingest` key cannot read and a `read` key
/// cannot write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Write events only. Safe to ship inside a client application.
    Ingest,
    /// Read everything in the workspace, write nothing.
    Read,
    /// Everything within the key's workspace, including managing its keys.
    Admin,
    /// The bootstrap key: admin in its own workspace plus management of
    /// workspaces and of keys in every workspace.
    Root,
}

impl Scope {
    /// May this key append events?
    pub fn can_ingest(self) -> bool {
        matches!(self, Scope::Ingest | Scope::Admin | Scope::Root)
    }
    /// May this key read data of its workspace?
    pub fn can_read(self) -> bool {
        matches!(self, Scope::Read | Scope::Admin | Scope::Root)
    }
    /// May this key change configuration of its workspace (keys, and later meters, …)?
    pub fn can_admin(self) -> bool {
        matches!(self, Scope::Admin | Scope::Root)
    }
    /// May this key manage workspaces and keys of other workspaces?
    pub fn is_root(self) -> bool {
        matches!(self, Scope::Root)
    }
    /// The scope's name as used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
            Scope::Root => "root",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of `ingest`, `read`, `admin`, `root`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?}; expected admin, read or ingest")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ingest" => Ok(Scope::Ingest),
            "read" => Ok(Scope::Read),
            "admin" => Ok(Scope::Admin),
            "root" => Ok(Scope::Root),
            other => Err(UnknownScope(other.to_owned())),
        }
    }
}
