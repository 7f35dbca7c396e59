//! Key scopes and what each may do.

crate::named_enum! {
    /// What a key may do. Ordered from least to most powerful, but permissions
    /// are not a simple ladder: an `ingest` key cannot read and a `read` key
    /// cannot write.
    pub enum Scope / UnknownScope ("a scope") {
        /// Write events only. Safe to ship inside a client application.
        Ingest = "ingest",
        /// Read everything in the workspace, write nothing.
        Read = "read",
        /// Everything within the key's workspace, including managing its keys.
        Admin = "admin",
        /// The bootstrap key: admin in its own workspace plus management of
        /// workspaces and of keys in every workspace.
        Root = "root",
    }
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
}
