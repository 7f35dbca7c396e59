//! Events checked against their declared property schemas at ingest. The
//! schemas themselves (types, the in-memory cache) are in
//! `sluice_store::schemas`, shared with the lake.

use serde_json::Value;
use sluice_core::Event;
pub use sluice_store::schemas::{PropertyType, Schemas, TypeSchema};

use crate::formats::{FieldError, ParseError};

/// Checking events against enforced schemas.
pub trait CheckEvents {
    /// Checks events against enforced schemas: `Err` lists every violation
    /// (event index, `properties.<name>`, why).
    fn check(&self, events: &[Event]) -> Result<(), ParseError>;
}

impl CheckEvents for Schemas {
    fn check(&self, events: &[Event]) -> Result<(), ParseError> {
        if self.is_empty() {
            return Ok(());
        }
        let mut errors = Vec::new();
        let mut invalid = 0;
        for (i, e) in events.iter().enumerate() {
            let Some(schema) = self.get(e.workspace.as_str(), e.event_type.as_str()) else { continue };
            if !schema.enforce {
                continue;
            }
            let props: serde_json::Map<String, Value> = serde_json::from_str(e.properties.get()).unwrap_or_default();
            let before = errors.len();
            for (name, ty) in &schema.properties {
                match props.get(name) {
                    None | Some(Value::Null) => {}
                    Some(v) if ty.accepts(v) => {}
                    Some(v) => {
                        let shown: String = v.to_string().chars().take(100).collect();
                        errors.push(FieldError {
                            index: i,
                            line: None,
                            field: format!("properties.{name}"),
                            reason: format!("must be {} (declared in the schema of `{}`), got {shown}", ty.name(), e.event_type.as_str()),
                        });
                    }
                }
            }
            if errors.len() > before {
                invalid += 1;
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ParseError::Invalid { errors, invalid_events: invalid })
        }
    }
}
