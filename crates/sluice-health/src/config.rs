//! The health configuration (docs/health.md): named measures, ordered
//! stages with entry rules, a scorecard per stage, bands. Parsing names the
//! path of every bad part (`stages[1].rule.all[0].measure`), and a
//! configuration is valid or refused whole.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sluice_store::EventsWanted;

use crate::HealthError;

/// The longest window a measure may have (ten years).
pub const MAX_DAYS: u32 = 3660;

/// A health configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Measures by name.
    pub measures: BTreeMap<String, Measure>,
    /// Stages in order: the first whose rule holds wins.
    pub stages: Vec<Stage>,
    /// Scorecards by stage name.
    #[serde(default)]
    pub scorecards: BTreeMap<String, Vec<ScoreItem>>,
    /// Band thresholds on the score.
    #[serde(default)]
    pub bands: Bands,
    /// At most one transition event per customer and kind in this time
    /// (humantime such as `"10m"`, or a number of seconds; when absent,
    /// the server's `health.transition_cooldown`, default `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "cooldown")]
    pub transition_cooldown: Option<String>,
    /// A score change larger than this is written to the history (default 5).
    #[serde(default = "default_step")]
    pub history_score_step: f64,
    /// The numeric attribute giving a customer's value for the priority
    /// (default `mrr`; 1 when unset).
    #[serde(default = "default_value_attribute")]
    pub value_attribute: String,
}

/// A cooldown as written: a duration text, or whole seconds (`600`), kept
/// as the text `"600s"`.
fn cooldown<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(secs) => Ok(Some(format!("{secs}s"))),
            None => Err(serde::de::Error::custom("must be a duration such as \"10m\" or a whole number of seconds")),
        },
        Some(_) => Err(serde::de::Error::custom("must be a duration such as \"10m\" or a whole number of seconds")),
    }
}

fn default_step() -> f64 {
    5.0
}
fn default_value_attribute() -> String {
    "mrr".into()
}

/// What a measure computes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Measure {
    /// Events of a type (any type when omitted), optionally with these
    /// property values, in the last `days` days.
    Count {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// Event type (any when omitted).
        event_type: Option<String>,
        /// Window length in local calendar days (≥ 1).
        days: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// Only events whose properties equal these values.
        #[serde(alias = "filter", alias = "where")]
        properties: Option<Map<String, Value>>,
    },
    /// Distinct users with events of a type (any when omitted) in the last `days` days.
    DistinctUsers {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// Event type (any when omitted).
        event_type: Option<String>,
        /// Window length in local calendar days (≥ 1).
        days: u32,
    },
    /// Local calendar days since the last event of a type.
    DaysSinceLast {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// Event type (any when omitted).
        event_type: Option<String>,
    },
    /// % change of a count between the last `days` days and the `days` before.
    Trend {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// Event type (any when omitted).
        event_type: Option<String>,
        /// Window length in local calendar days (≥ 1).
        days: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        /// Only events whose properties equal these values.
        #[serde(alias = "filter", alias = "where")]
        properties: Option<Map<String, Value>>,
    },
    /// Local calendar days until a date attribute (negative once passed).
    DaysUntil {
        /// A date attribute.
        attribute: String,
    },
    /// A meter's usage this calendar month over a numeric attribute, or
    /// over the included units (`free_units`) of the meter's charge in the
    /// plan of the customer's subscription at that time.
    UsageVsEntitlement {
        /// The meter key.
        meter: String,
        /// The numeric attribute with the entitlement (none: the plan's included units).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attribute: Option<String>,
    },
    /// Local calendar days in the current stage.
    DaysInStage {},
    /// A customer attribute's value.
    Attribute {
        /// The attribute.
        attribute: String,
    },
}

impl Measure {
    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Measure::Count { .. } => "count",
            Measure::DistinctUsers { .. } => "distinct_users",
            Measure::DaysSinceLast { .. } => "days_since_last",
            Measure::Trend { .. } => "trend",
            Measure::DaysUntil { .. } => "days_until",
            Measure::UsageVsEntitlement { .. } => "usage_vs_entitlement",
            Measure::DaysInStage {} => "days_in_stage",
            Measure::Attribute { .. } => "attribute",
        }
    }

    /// Days of history before the evaluation's local date this measure
    /// reads (a trend reads two windows).
    pub fn lookback_days(&self) -> u32 {
        match self {
            Measure::Count { days, .. } | Measure::DistinctUsers { days, .. } => *days,
            Measure::Trend { days, .. } => days * 2,
            _ => 0,
        }
    }
}

/// A stage and its entry rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Name.
    pub name: String,
    /// Entry rule.
    pub rule: Rule,
}

/// A rule: all / any / not over comparisons.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// Every part holds (an empty list always holds).
    All(Vec<Rule>),
    /// At least one part holds.
    Any(Vec<Rule>),
    /// The part does not hold.
    Not(Box<Rule>),
    /// A comparison.
    Cmp(Comparison),
}

/// What a comparison reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A named measure.
    Measure(String),
    /// A customer attribute.
    Attribute(String),
}

/// `==`, `!=`, `<`, `<=`, `>`, `>=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "==" | "=" => Op::Eq,
            "!=" => Op::Ne,
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            _ => return None,
        })
    }
    /// As written.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// `{"measure": …, "op": …, "value": …}` or `{"attribute": …, …}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// What is compared.
    pub left: Operand,
    /// How.
    pub op: Op,
    /// With what.
    pub value: Value,
}

impl Rule {
    /// Parses a rule, naming the path of the first bad part.
    pub fn parse(v: &Value, path: &str) -> Result<Rule, (String, String)> {
        let Value::Object(m) = v else {
            return Err((path.into(), "must be an object: {\"all\": […]}, {\"any\": […]}, {\"not\": …} or a comparison".into()));
        };
        let list = |key: &str, items: &Value| -> Result<Vec<Rule>, (String, String)> {
            let Value::Array(a) = items else {
                return Err((format!("{path}.{key}"), "must be a list of rules".into()));
            };
            a.iter().enumerate().map(|(i, r)| Rule::parse(r, &format!("{path}.{key}[{i}]"))).collect()
        };
        if m.contains_key("all") || m.contains_key("any") || m.contains_key("not") {
            if m.len() != 1 {
                return Err((path.into(), "a rule has exactly one of all, any or not".into()));
            }
            let (k, v) = m.iter().next().expect("one key");
            return match k.as_str() {
                "all" => Ok(Rule::All(list("all", v)?)),
                "any" => Ok(Rule::Any(list("any", v)?)),
                // `{"not": [a, b]}` reads as not (a and b), like `all`'s list.
                _ if v.is_array() => Ok(Rule::Not(Box::new(Rule::All(list("not", v)?)))),
                _ => Ok(Rule::Not(Box::new(Rule::parse(v, &format!("{path}.not"))?))),
            };
        }
        for k in m.keys() {
            if !["measure", "attribute", "op", "value"].contains(&k.as_str()) {
                return Err((format!("{path}.{k}"), "unknown field; a comparison has measure or attribute, op and value".into()));
            }
        }
        let left = match (m.get("measure"), m.get("attribute")) {
            (Some(Value::String(s)), None) => Operand::Measure(s.clone()),
            (None, Some(Value::String(s))) => Operand::Attribute(s.clone()),
            (Some(_), Some(_)) => return Err((path.into(), "give measure or attribute, not both".into())),
            (Some(_), None) => return Err((format!("{path}.measure"), "must be a measure name".into())),
            (None, Some(_)) => return Err((format!("{path}.attribute"), "must be an attribute name".into())),
            (None, None) => {
                return Err((path.into(), "must be {\"all\": …}, {\"any\": …}, {\"not\": …} or a comparison with measure or attribute".into()))
            }
        };
        let op = match m.get("op") {
            Some(Value::String(s)) => {
                Op::parse(s).ok_or_else(|| (format!("{path}.op"), format!("unknown operator {s:?}; use ==, !=, <, <=, > or >=")))?
            }
            _ => return Err((format!("{path}.op"), "required: ==, !=, <, <=, > or >=".into())),
        };
        let value = match m.get("value") {
            Some(v @ (Value::Number(_) | Value::String(_) | Value::Bool(_))) => v.clone(),
            Some(_) => return Err((format!("{path}.value"), "must be a number, a string (a date as YYYY-MM-DD) or a boolean".into())),
            None => return Err((format!("{path}.value"), "required".into())),
        };
        Ok(Rule::Cmp(Comparison { left, op, value }))
    }

    /// As JSON (the shape it was written in).
    pub fn to_json(&self) -> Value {
        match self {
            Rule::All(v) => serde_json::json!({"all": v.iter().map(Rule::to_json).collect::<Vec<_>>()}),
            Rule::Any(v) => serde_json::json!({"any": v.iter().map(Rule::to_json).collect::<Vec<_>>()}),
            Rule::Not(r) => serde_json::json!({"not": r.to_json()}),
            Rule::Cmp(c) => {
                let mut m = Map::new();
                match &c.left {
                    Operand::Measure(s) => m.insert("measure".into(), Value::String(s.clone())),
                    Operand::Attribute(s) => m.insert("attribute".into(), Value::String(s.clone())),
                };
                m.insert("op".into(), Value::String(c.op.as_str().into()));
                m.insert("value".into(), c.value.clone());
                Value::Object(m)
            }
        }
    }

    fn measures<'a>(&'a self, out: &mut Vec<(&'a str, String)>, path: &str) {
        match self {
            Rule::All(v) => v.iter().enumerate().for_each(|(i, r)| r.measures(out, &format!("{path}.all[{i}]"))),
            Rule::Any(v) => v.iter().enumerate().for_each(|(i, r)| r.measures(out, &format!("{path}.any[{i}]"))),
            Rule::Not(r) => r.measures(out, &format!("{path}.not")),
            Rule::Cmp(Comparison { left: Operand::Measure(m), .. }) => out.push((m, format!("{path}.measure"))),
            Rule::Cmp(_) => {}
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        // The path of the rule itself is added by serde_path_to_error; the
        // part inside it is named here.
        Rule::parse(&v, "rule").map_err(|(p, m)| serde::de::Error::custom(format!("{}: {m}", p.trim_start_matches("rule").trim_start_matches('.'))))
    }
}

/// One weighted measure of a scorecard.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreItem {
    /// The measure.
    pub measure: String,
    /// Its weight (> 0).
    pub weight: f64,
    /// Points by threshold: the first `min` the value reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<Threshold>>,
    /// Or a bounded linear scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear: Option<Linear>,
}

/// `{"min": 10, "points": 100}`; `min: null` matches every value.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// Lowest value (inclusive) that gets these points.
    pub min: Option<f64>,
    /// Points 0–100.
    pub points: f64,
}

/// 0 points at `from`, 100 at `to`, clamped.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Linear {
    /// Value that gets 0 points.
    pub from: f64,
    /// Value that gets 100 points.
    pub to: f64,
}

/// Band thresholds: score ≥ `good` is good, ≥ `normal` normal, else bad.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bands {
    /// Lowest good score.
    pub good: f64,
    /// Lowest normal score.
    pub normal: f64,
}

impl Default for Bands {
    fn default() -> Self {
        Bands { good: 70.0, normal: 40.0 }
    }
}

impl HealthConfig {
    /// What of a customer's events its windowed measures read: the types
    /// they count (every type when one counts any), each as far back as the
    /// longest window that counts it, `user_id` for `distinct_users`,
    /// `properties` when a count filters on them (`days_since_last` reads
    /// its type's last event on its own).
    pub fn events_wanted(&self) -> EventsWanted<'_> {
        let mut types: Option<Vec<(&str, u32)>> = Some(Vec::new());
        let (mut user_id, mut properties) = (false, false);
        for m in self.measures.values() {
            let event_type = match m {
                Measure::Count { event_type, properties: p, .. } | Measure::Trend { event_type, properties: p, .. } => {
                    properties |= p.as_ref().is_some_and(|p| !p.is_empty());
                    event_type
                }
                Measure::DistinctUsers { event_type, .. } => {
                    user_id = true;
                    event_type
                }
                _ => continue,
            };
            match (event_type, types.as_mut()) {
                (Some(t), Some(ts)) => match ts.iter_mut().find(|(name, _)| *name == t.as_str()) {
                    Some((_, days)) => *days = (*days).max(m.lookback_days()),
                    None => ts.push((t.as_str(), m.lookback_days())),
                },
                (Some(_), None) => {}
                (None, _) => types = None,
            }
        }
        let days = self.measures.values().map(Measure::lookback_days).max().unwrap_or(0).max(1);
        EventsWanted { types, days, user_id, properties }
    }

    /// Parses and validates a new configuration (a PUT, a backtest's):
    /// every problem, each with its path.
    pub fn parse(v: &Value) -> Result<HealthConfig, HealthError> {
        HealthConfig::parse_with(v, true)
    }

    /// Parses a stored configuration version. It was valid when it was
    /// stored; rules added since (no weight of zero beside others) apply to
    /// new versions only, so an older version keeps working.
    pub fn load(v: &Value) -> Result<HealthConfig, HealthError> {
        HealthConfig::parse_with(v, false)
    }

    fn parse_with(v: &Value, new: bool) -> Result<HealthConfig, HealthError> {
        let cfg: HealthConfig = serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // A rule's error names the part inside the rule first.
            let (path, msg) = match inner.split_once(": ") {
                Some((sub, msg)) if path.ends_with("rule") && !sub.contains(' ') => (format!("{path}.{sub}"), msg.to_owned()),
                _ => (path, inner),
            };
            HealthError::invalid(if path == "." { String::new() } else { path }, msg)
        })?;
        let errs = cfg.validate(new);
        if errs.is_empty() {
            Ok(cfg)
        } else {
            Err(HealthError::Invalid(errs))
        }
    }

    /// Every problem of a parsed configuration (`new`: also the rules
    /// added since earlier versions were stored).
    pub fn validate(&self, new: bool) -> Vec<crate::FieldError> {
        let mut errs = Vec::new();
        let mut err = |p: String, m: String| errs.push(crate::FieldError { path: p, message: m });
        for (name, m) in &self.measures {
            if name.is_empty() || name.len() > 100 {
                err(format!("measures.{name}"), "a measure name has 1 to 100 characters".into());
            }
            match m {
                Measure::Count { days, .. } | Measure::DistinctUsers { days, .. } | Measure::Trend { days, .. } => {
                    if *days == 0 {
                        err(format!("measures.{name}.days"), "a window of 0 days is empty; give at least 1".into());
                    } else if *days > MAX_DAYS {
                        err(format!("measures.{name}.days"), format!("at most {MAX_DAYS}"));
                    }
                }
                Measure::DaysUntil { attribute }
                | Measure::Attribute { attribute }
                | Measure::UsageVsEntitlement { attribute: Some(attribute), .. }
                    if attribute.is_empty() =>
                {
                    err(format!("measures.{name}.attribute"), "must not be empty".into());
                }
                _ => {}
            }
        }
        if self.stages.is_empty() {
            err("stages".into(), "give at least one stage".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.stages.iter().enumerate() {
            if s.name.is_empty() || s.name.len() > 100 {
                err(format!("stages[{i}].name"), "a stage name has 1 to 100 characters".into());
            }
            if !seen.insert(s.name.as_str()) {
                err(format!("stages[{i}].name"), format!("stage {:?} is listed twice", s.name));
            }
            let mut used = Vec::new();
            s.rule.measures(&mut used, &format!("stages[{i}].rule"));
            for (m, path) in used {
                if !self.measures.contains_key(m) {
                    err(path, format!("unknown measure {m:?}"));
                }
            }
        }
        for (stage, items) in &self.scorecards {
            if !self.stages.iter().any(|s| &s.name == stage) {
                err(format!("scorecards.{stage}"), format!("no stage is named {stage:?}"));
            }
            if items.is_empty() {
                err(format!("scorecards.{stage}"), "give at least one measure".into());
            }
            if !new && !items.is_empty() && items.iter().all(|it| it.weight == 0.0) {
                err(format!("scorecards.{stage}"), "the weights are all zero; at least one must be above 0".into());
            }
            for (i, it) in items.iter().enumerate() {
                let p = format!("scorecards.{stage}[{i}]");
                if !self.measures.contains_key(&it.measure) {
                    err(format!("{p}.measure"), format!("unknown measure {:?}", it.measure));
                }
                if !it.weight.is_finite() || it.weight < 0.0 || (new && it.weight == 0.0) {
                    err(format!("{p}.weight"), "must be a number above 0 (a weight of zero adds nothing to the score)".into());
                }
                match (&it.thresholds, &it.linear) {
                    (Some(_), Some(_)) => err(p.clone(), "give thresholds or linear, not both".into()),
                    (None, None) => err(p.clone(), "give thresholds or linear".into()),
                    (Some(t), None) => {
                        if t.is_empty() {
                            err(format!("{p}.thresholds"), "give at least one threshold".into());
                        }
                        for (j, th) in t.iter().enumerate() {
                            if !(0.0..=100.0).contains(&th.points) {
                                err(format!("{p}.thresholds[{j}].points"), "must be 0 to 100".into());
                            }
                            if th.min.is_some_and(|m| !m.is_finite()) {
                                err(format!("{p}.thresholds[{j}].min"), "must be a number or null".into());
                            }
                        }
                    }
                    (None, Some(l)) => {
                        if !l.from.is_finite() || !l.to.is_finite() || l.from == l.to {
                            err(format!("{p}.linear"), "from and to must be different numbers".into());
                        }
                    }
                }
            }
        }
        if !(0.0..=100.0).contains(&self.bands.good) || !(0.0..=100.0).contains(&self.bands.normal) || self.bands.normal > self.bands.good {
            err("bands".into(), "need 0 ≤ normal ≤ good ≤ 100".into());
        }
        if self.transition_cooldown.as_deref().is_some_and(|c| humantime::parse_duration(c).is_err()) {
            err("transition_cooldown".into(), "must be a duration such as \"10m\" or \"0s\"".into());
        }
        if !self.history_score_step.is_finite() || self.history_score_step < 0.0 {
            err("history_score_step".into(), "must be a number ≥ 0".into());
        }
        errs
    }

    /// The transition cooldown (`default` when the configuration has none).
    pub fn cooldown(&self, default: Duration) -> Duration {
        self.transition_cooldown.as_deref().and_then(|c| humantime::parse_duration(c).ok()).unwrap_or(default)
    }

    /// The scorecard of a stage.
    pub fn scorecard(&self, stage: &str) -> Option<&[ScoreItem]> {
        self.scorecards.get(stage).map(Vec::as_slice)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::HealthConfig;

    /// Types with their days, the longest window, users, properties.
    type Wanted = (Option<Vec<(String, u32)>>, u32, bool, bool);

    fn wanted(measures: serde_json::Value) -> Wanted {
        let cfg = HealthConfig::parse(&json!({"measures": measures, "stages": [{"name": "a", "rule": {"all": []}}]})).unwrap();
        let w = cfg.events_wanted();
        (w.types.map(|t| t.into_iter().map(|(t, d)| (t.to_owned(), d)).collect()), w.days, w.user_id, w.properties)
    }

    #[test]
    fn events_wanted_are_the_types_and_columns_the_windowed_measures_read() {
        let types = |t: &[(&str, u32)]| Some(t.iter().map(|(s, d)| ((*s).to_owned(), *d)).collect::<Vec<_>>());
        // days_since_last reads its own type's last event: not here. A type
        // is read as far back as its longest window.
        assert_eq!(
            wanted(json!({"r": {"kind": "count", "event_type": "report", "days": 30}, "r7": {"kind": "count", "event_type": "report", "days": 7},
                "idle": {"kind": "days_since_last", "event_type": "login"}})),
            (types(&[("report", 30)]), 30, false, false)
        );
        // Types in the order of the measures' names; a trend looks back
        // twice its days, and each type only its own window.
        assert_eq!(
            wanted(json!({"u": {"kind": "distinct_users", "event_type": "page", "days": 7},
                "t": {"kind": "trend", "event_type": "api", "days": 14, "properties": {"plan": "pro"}},
                "v": {"kind": "count", "event_type": "page", "days": 3}})),
            (types(&[("api", 28), ("page", 7)]), 28, true, true)
        );
        // One measure of any type: every type, as far as the longest
        // window. An empty filter filters nothing.
        assert_eq!(
            wanted(json!({"a": {"kind": "count", "days": 1, "properties": {}}, "b": {"kind": "count", "event_type": "x", "days": 9}})),
            (None, 9, false, false)
        );
        assert_eq!(wanted(json!({"m": {"kind": "attribute", "attribute": "mrr"}})), (Some(Vec::new()), 1, false, false));
    }
}
