//! Declared property schemas (`PUT /v1/schemas/{type}`): the types of
//! properties, kept in memory for ingest (which checks events against
//! them, `sluice_ingest::schemas`) and the lake (typed columns).
//!
//! A schema names properties of one event type and their types: `int64`,
//! `float64`, `bool`, `string` or `timestamp` (an RFC 3339 string). The lake
//! writes each declared property as a typed column `p_<name>`. When the
//! schema is enforced (the default), an event whose property has another
//! type is refused with a 400 naming the event and the property, so a typed
//! column never silently turns a bad value into a null. A property that is
//! absent or `null` is allowed (the column is null).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub use sluice_core::lake::PropertyType;

/// The declared properties of one event type.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeSchema {
    /// Name → type, in declaration order.
    pub properties: Vec<(String, PropertyType)>,
    /// Refuse violating events at ingest.
    pub enforce: bool,
}

/// Declared schemas by (workspace, event type).
type ByType = HashMap<(String, String), Arc<TypeSchema>>;

/// Every workspace's schemas, shared by ingest and the lake. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Schemas {
    inner: Arc<RwLock<ByType>>,
}

impl Schemas {
    /// Loads every declared schema from the store.
    pub async fn load(store: &crate::Store) -> Result<Schemas, crate::StoreError> {
        let s = Schemas::default();
        for e in store.event_schemas(None).await? {
            s.set(&e);
        }
        Ok(s)
    }

    /// Sets (or replaces) one event type's schema.
    pub fn set(&self, e: &crate::EventSchema) {
        let properties = e.properties.iter().filter_map(|(n, t)| Some((n.clone(), PropertyType::parse(t)?))).collect();
        let schema = Arc::new(TypeSchema { properties, enforce: e.enforce });
        self.inner.write().expect("schemas lock").insert((e.workspace.clone(), e.event_type.clone()), schema);
    }

    /// Removes one event type's schema.
    pub fn remove(&self, workspace: &str, event_type: &str) {
        self.inner.write().expect("schemas lock").remove(&(workspace.to_owned(), event_type.to_owned()));
    }

    /// The schema of one event type, if declared.
    pub fn get(&self, workspace: &str, event_type: &str) -> Option<Arc<TypeSchema>> {
        let map = self.inner.read().expect("schemas lock");
        if map.is_empty() {
            return None;
        }
        map.get(&(workspace.to_owned(), event_type.to_owned())).cloned()
    }

    /// Every declared property of a workspace (over all event types), by
    /// name: the typed lake columns.
    pub fn columns(&self, workspace: &str) -> Vec<(String, PropertyType)> {
        let map = self.inner.read().expect("schemas lock");
        let mut cols: Vec<(String, PropertyType)> = Vec::new();
        let mut keys: Vec<&(String, String)> = map.keys().filter(|(w, _)| w == workspace).collect();
        keys.sort();
        for k in keys {
            for (n, t) in &map[k].properties {
                if !cols.iter().any(|(c, _)| c == n) {
                    cols.push((n.clone(), *t));
                }
            }
        }
        cols.sort_by(|a, b| a.0.cmp(&b.0));
        cols
    }

    /// No schema is declared anywhere (ingest then checks nothing).
    pub fn is_empty(&self) -> bool {
        self.inner.read().expect("schemas lock").is_empty()
    }
}
