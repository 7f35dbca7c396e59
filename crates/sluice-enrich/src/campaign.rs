//! UTM campaign parameters: from the page URL's query first, then from
//! `context.campaign`, field by field.

use serde_json::Value;
use url::Url;

/// The five UTM columns.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Utm {
    pub source: Option<String>,
    pub medium: Option<String>,
    pub campaign: Option<String>,
    pub term: Option<String>,
    pub content: Option<String>,
}

impl Utm {
    /// Each field from the page URL if it has it, else from the campaign
    /// object.
    pub fn read(page: Option<&Url>, campaign: Option<&Value>) -> Self {
        let from_url = page.map(Self::from_query).unwrap_or_default();
        match campaign {
            Some(campaign) => from_url.or(Self::from_campaign(campaign)),
            None => from_url,
        }
    }

    /// The `utm_*` query parameters; the first non-empty occurrence of each
    /// wins.
    fn from_query(url: &Url) -> Self {
        let mut utm = Self::default();
        if !url.query().is_some_and(|query| query.contains("utm_")) {
            return utm;
        }
        for (key, value) in url.query_pairs() {
            let field = match &*key {
                "utm_source" => &mut utm.source,
                "utm_medium" => &mut utm.medium,
                "utm_campaign" => &mut utm.campaign,
                "utm_term" => &mut utm.term,
                "utm_content" => &mut utm.content,
                _ => continue,
            };
            let value = value.trim();
            if field.is_none() && !value.is_empty() {
                *field = Some(value.to_owned());
            }
        }
        utm
    }

    /// Segment's `context.campaign` (`source`, `medium`, `name`, `term`,
    /// `content`), also accepting `campaign` and the `utm_*` names.
    fn from_campaign(campaign: &Value) -> Self {
        let first = |keys: &[&str]| keys.iter().find_map(|key| scalar(campaign, key));
        Self {
            source: first(&["source", "utm_source"]),
            medium: first(&["medium", "utm_medium"]),
            campaign: first(&["name", "campaign", "utm_campaign"]),
            term: first(&["term", "utm_term"]),
            content: first(&["content", "utm_content"]),
        }
    }

    /// Fills the fields `self` lacks from `other`.
    fn or(self, other: Self) -> Self {
        Self {
            source: self.source.or(other.source),
            medium: self.medium.or(other.medium),
            campaign: self.campaign.or(other.campaign),
            term: self.term.or(other.term),
            content: self.content.or(other.content),
        }
    }
}

/// The trimmed non-empty string, or the number written out, at `object[key]`.
fn scalar(object: &Value, key: &str) -> Option<String> {
    match object.get(key)? {
        Value::String(s) => Some(s.trim()).filter(|s| !s.is_empty()).map(str::to_owned),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
