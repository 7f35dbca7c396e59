//! Reading the enrichment inputs out of an event's `context`, accepting both
//! the snake_case and the Segment spellings.

use serde_json::Value;

/// The raw inputs, borrowed from the context. String fields are `None` when
/// absent, not strings, or empty (after trimming whitespace).
#[derive(Debug, Default)]
pub(crate) struct Fields<'a> {
    pub user_agent: Option<&'a str>,
    pub page_url: Option<&'a str>,
    pub referrer: Option<&'a str>,
    pub ip: Option<&'a str>,
    pub campaign: Option<&'a Value>,
}

impl<'a> Fields<'a> {
    pub fn read(context: &'a Value) -> Self {
        let page = context.get("page");
        Self {
            user_agent: string(context, "user_agent").or_else(|| string(context, "userAgent")),
            page_url: string(context, "page_url").or_else(|| page.and_then(|p| string(p, "url"))),
            referrer: referrer(context).or_else(|| page.and_then(|p| string(p, "referrer"))),
            ip: string(context, "ip"),
            campaign: context.get("campaign").filter(|c| c.is_object()),
        }
    }
}

/// `context.referrer`, either a URL string or Segment's referrer object
/// `{type, name, url, link}` whose `url` is used.
fn referrer(context: &Value) -> Option<&str> {
    match context.get("referrer")? {
        Value::String(_) => string(context, "referrer"),
        object @ Value::Object(_) => string(object, "url"),
        _ => None,
    }
}

/// The non-blank string at `object[key]`, trimmed.
pub(crate) fn string<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    let value = object.get(key)?.as_str()?.trim();
    (!value.is_empty()).then_some(value)
}
