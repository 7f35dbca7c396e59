//! The evaluation of one customer at a time `T`: measures, stage, score,
//! band, priority and the explanation. A pure function of its inputs, so
//! the live path, `as_of`, a recompute and a backtest give the same result
//! for the same data (docs/health.md, "Definitions").
//!
//! Windows are local calendar days in the workspace time zone: "the last N
//! days" at `T` runs from 00:00 of the local date N−1 days before `T`'s
//! local date up to `T` inclusive.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Days, NaiveDate, Utc};
use chrono_tz::Tz;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};
use sluice_metering::usage::local_start;
use sluice_store::{HealthEventRun, OverrideRow};

use crate::config::{Comparison, HealthConfig, Measure, Op, Operand, Rule, ScoreItem};

/// A measure's or attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// A number (exact).
    Num(Decimal),
    /// A date (`YYYY-MM-DD`).
    Date(NaiveDate),
    /// Text.
    Str(String),
    /// true / false.
    Bool(bool),
}

impl Val {
    /// From a JSON attribute or rule value (`null` and objects: none).
    pub fn from_json(v: &Value) -> Option<Val> {
        match v {
            Value::Number(n) => decimal_of(n).map(Val::Num),
            Value::String(s) => Some(match NaiveDate::parse_from_str(s, "%Y-%m-%d") {
                Ok(d) if s.len() == 10 => Val::Date(d),
                _ => Val::Str(s.clone()),
            }),
            Value::Bool(b) => Some(Val::Bool(*b)),
            _ => None,
        }
    }

    /// As JSON (as the views show it: [`ValView`]).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(ValView(self)).unwrap_or(Value::Null)
    }

    fn number(&self) -> Option<Decimal> {
        match self {
            Val::Num(d) => Some(*d),
            Val::Str(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// The local date of a date attribute (a date, or an RFC 3339 time).
    fn date(&self, tz: Tz) -> Option<NaiveDate> {
        match self {
            Val::Date(d) => Some(*d),
            Val::Str(s) => DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&tz).date_naive()),
            _ => None,
        }
    }
}

fn decimal_of(n: &serde_json::Number) -> Option<Decimal> {
    if let Some(i) = n.as_i64() {
        return Some(Decimal::from(i));
    }
    n.to_string().parse::<Decimal>().ok().or_else(|| Decimal::from_scientific(&n.to_string()).ok())
}

/// A decimal as a JSON number (as the views show it: [`Num`]).
pub fn num(d: Decimal) -> Value {
    serde_json::to_value(Num(d)).unwrap_or(Value::Null)
}

fn dec(f: f64) -> Decimal {
    Decimal::from_f64(f).unwrap_or_default().normalize()
}

/// What an evaluation reads.
pub struct Inputs<'a> {
    /// The time evaluated.
    pub at: DateTime<Utc>,
    /// The workspace time zone.
    pub tz: Tz,
    /// The customer's events from the start of the longest window to
    /// `at`, one run per type.
    pub events: &'a [HealthEventRun],
    /// The last event at or before `at` by type ("" for any type).
    pub last_seen: &'a HashMap<String, DateTime<Utc>>,
    /// Attributes as they were at `at`.
    pub attributes: &'a Map<String, Value>,
    /// Each configured meter's usage this month up to `at`.
    pub usage: &'a HashMap<String, Decimal>,
    /// Included units of each meter in the plan of the customer's
    /// subscription at `at` (for `usage_vs_entitlement` without attribute).
    pub included: &'a HashMap<String, Decimal>,
    /// The stage the customer held before, and since when.
    pub previous: Option<(Option<String>, Option<DateTime<Utc>>)>,
    /// The override in force at `at`, if any.
    pub override_row: Option<&'a OverrideRow>,
}

/// One measure in the explanation.
#[derive(Debug, Clone)]
pub struct MeasureResult {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: &'static str,
    /// Value (none: no data).
    pub value: Option<Val>,
    /// Points 0–100, when it is in the stage's scorecard and has data.
    pub points: Option<Decimal>,
    /// Its weight as configured (0 when not in the stage's scorecard).
    pub weight: Option<Decimal>,
    /// Its share of the score after weights of measures without data were shared.
    pub effective_weight: Option<Decimal>,
    /// points × effective weight: what it adds to the score.
    pub contribution: Option<Decimal>,
    /// Why there is no value, or how the points came.
    pub note: Option<String>,
    /// It is in the scorecard of the customer's stage.
    pub in_scorecard: bool,
}

/// The result of an evaluation.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// When.
    pub at: DateTime<Utc>,
    /// The stage (none when no rule holds).
    pub stage: Option<String>,
    /// The rule that put the customer there.
    pub stage_rule: Option<Value>,
    /// `rule`, `override` or `none`.
    pub stage_reason: &'static str,
    /// When the customer entered the stage.
    pub stage_since: Option<DateTime<Utc>>,
    /// The override in force.
    pub override_view: Option<Value>,
    /// 0–100.
    pub score: Option<Decimal>,
    /// good / normal / bad.
    pub band: Option<&'static str>,
    /// Every measure.
    pub measures: Vec<MeasureResult>,
    /// Sentences explaining the result.
    pub notes: Vec<String>,
    /// The customer's value (the value attribute, 1 when unset).
    pub value: Decimal,
    /// (100 − score) / 100 × value.
    pub priority: Option<Decimal>,
    /// When time alone may change the result next.
    pub next_change: DateTime<Utc>,
}

/// The local date of `t`.
pub fn local_date(tz: Tz, t: DateTime<Utc>) -> NaiveDate {
    t.with_timezone(&tz).date_naive()
}

/// Start of "the last `days` days" at `at`.
pub fn window_start(tz: Tz, at: DateTime<Utc>, days: u32) -> DateTime<Utc> {
    let d = local_date(tz, at);
    local_start(tz, d.checked_sub_days(Days::new(u64::from(days.max(1)) - 1)).unwrap_or(d), 0)
}

/// Start of the calendar month of `at` (usage_vs_entitlement's period).
pub fn month_start(tz: Tz, at: DateTime<Utc>) -> DateTime<Utc> {
    let d = local_date(tz, at);
    local_start(tz, NaiveDate::from_ymd_opt(chrono::Datelike::year(&d), chrono::Datelike::month(&d), 1).unwrap_or(d), 0)
}

fn props_match(props: Option<&str>, filter: Option<&Map<String, Value>>) -> bool {
    let Some(f) = filter.filter(|f| !f.is_empty()) else { return true };
    let Some(p) = props else { return false };
    let Ok(Value::Object(p)) = serde_json::from_str::<Value>(p) else { return false };
    f.iter().all(|(k, v)| p.get(k) == Some(v))
}

/// The runs of `event_type` (every run: any type).
fn runs<'a>(inp: &'a Inputs, event_type: Option<&'a str>) -> impl Iterator<Item = &'a HealthEventRun> + 'a {
    inp.events.iter().filter(move |r| event_type.is_none_or(|t| r.event_type == t))
}

fn count(inp: &Inputs, event_type: Option<&str>, props: Option<&Map<String, Value>>, from: DateTime<Utc>, to_excl: Option<DateTime<Utc>>) -> usize {
    let (from, at) = (from.timestamp_micros(), inp.at.timestamp_micros());
    let to = to_excl.map(|t| t.timestamp_micros());
    let inside = |ts: i64| ts >= from && ts <= at && to.is_none_or(|t| ts < t);
    runs(inp, event_type).map(|r| r.ts.iter().enumerate().filter(|(i, ts)| inside(**ts) && props_match(r.properties(*i), props)).count()).sum()
}

/// A measure's value at `inp.at` (none: no data), with a note when none.
fn measure(m: &Measure, inp: &Inputs) -> (Option<Val>, Option<String>) {
    let tz = inp.tz;
    let today = local_date(tz, inp.at);
    match m {
        Measure::Count { event_type, days, properties } => {
            let n = count(inp, event_type.as_deref(), properties.as_ref(), window_start(tz, inp.at, *days), None);
            (Some(Val::Num(Decimal::from(n))), None)
        }
        Measure::DistinctUsers { event_type, days } => {
            let from = window_start(tz, inp.at, *days).timestamp_micros();
            let at = inp.at.timestamp_micros();
            let users: HashSet<&str> = runs(inp, event_type.as_deref())
                .flat_map(|r| r.ts.iter().enumerate().filter(|(_, ts)| **ts >= from && **ts <= at).filter_map(|(i, _)| r.user_id(i)))
                .collect();
            (Some(Val::Num(Decimal::from(users.len()))), None)
        }
        Measure::DaysSinceLast { event_type } => match inp.last_seen.get(event_type.as_deref().unwrap_or("")) {
            Some(t) => (Some(Val::Num(Decimal::from((today - local_date(tz, *t)).num_days()))), None),
            None => (None, Some(format!("no {} event yet", event_type.as_deref().unwrap_or("")).replace("no  event", "no event"))),
        },
        Measure::Trend { event_type, days, properties } => {
            let cur_start = window_start(tz, inp.at, *days);
            let prev_start = window_start(tz, inp.at, days * 2);
            let last = count(inp, event_type.as_deref(), properties.as_ref(), cur_start, None);
            let prev = count(inp, event_type.as_deref(), properties.as_ref(), prev_start, Some(cur_start));
            if prev == 0 {
                return (None, Some(format!("no events in the {days} days before the last {days} (a change from 0 is not a percentage)")));
            }
            let pct = (Decimal::from(last) - Decimal::from(prev)) / Decimal::from(prev) * Decimal::from(100);
            (Some(Val::Num(pct.round_dp(4))), None)
        }
        Measure::DaysUntil { attribute } => match inp.attributes.get(attribute).and_then(Val::from_json).and_then(|v| v.date(tz)) {
            Some(d) => (Some(Val::Num(Decimal::from((d - today).num_days()))), None),
            None => (None, Some(format!("attribute {attribute:?} is not set to a date"))),
        },
        Measure::UsageVsEntitlement { meter, attribute } => {
            let ent = match attribute {
                Some(a) => inp.attributes.get(a).and_then(Val::from_json).and_then(|v| v.number()),
                None => inp.included.get(meter).copied(),
            };
            match ent.filter(|d| *d > Decimal::ZERO) {
                Some(ent) => {
                    let used = inp.usage.get(meter).copied().unwrap_or_default();
                    (Some(Val::Num((used / ent).round_dp(6))), None)
                }
                None => (
                    None,
                    Some(match attribute {
                        Some(a) => format!("attribute {a:?} is not set to a number above 0"),
                        None => format!("no subscription whose plan includes units of meter {meter:?}"),
                    }),
                ),
            }
        }
        Measure::DaysInStage {} => match inp.previous.as_ref().and_then(|p| p.1) {
            Some(since) => (Some(Val::Num(Decimal::from((today - local_date(tz, since)).num_days()))), None),
            None => (None, Some("not evaluated before".into())),
        },
        Measure::Attribute { attribute } => match inp.attributes.get(attribute).and_then(Val::from_json) {
            Some(v) => (Some(v), None),
            None => (None, Some(format!("attribute {attribute:?} is not set"))),
        },
    }
}

fn compare(a: &Val, op: Op, b: &Val) -> bool {
    use std::cmp::Ordering;
    let numeric = matches!(a, Val::Num(_)) || matches!(b, Val::Num(_));
    let ord: Option<Ordering> = match (a, b) {
        // A number against a number, or against text that is one ("5000").
        _ if numeric => a.number().zip(b.number()).map(|(x, y)| x.cmp(&y)),
        (Val::Date(x), Val::Date(y)) => Some(x.cmp(y)),
        (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
        (Val::Bool(x), Val::Bool(y)) => return matches!((op, x == y), (Op::Eq, true) | (Op::Ne, false)),
        _ => None,
    };
    let Some(o) = ord else {
        // Different kinds: only "not equal" holds.
        return op == Op::Ne;
    };
    match op {
        Op::Eq => o == Ordering::Equal,
        Op::Ne => o != Ordering::Equal,
        Op::Lt => o == Ordering::Less,
        Op::Le => o != Ordering::Greater,
        Op::Gt => o == Ordering::Greater,
        Op::Ge => o != Ordering::Less,
    }
}

/// Whether a rule holds, in three-valued logic: a comparison with a side
/// without data is unknown (`None`), `not` of unknown is unknown, `all` is
/// false if a part is false, else unknown if a part is unknown; `any` is
/// true if a part is true, else unknown if a part is unknown. A stage's
/// rule must be true: a customer without a `seats` attribute is neither
/// `seats < 100` nor `not (seats < 100)`.
fn holds(r: &Rule, values: &HashMap<&str, Option<Val>>, attrs: &Map<String, Value>) -> Option<bool> {
    match r {
        Rule::All(v) => all3(v.iter().map(|r| holds(r, values, attrs))),
        // any(x…) = not all(not x…).
        Rule::Any(v) => all3(v.iter().map(|r| holds(r, values, attrs).map(|b| !b))).map(|b| !b),
        Rule::Not(r) => holds(r, values, attrs).map(|b| !b),
        Rule::Cmp(Comparison { left, op, value }) => {
            let l = match left {
                Operand::Measure(m) => values.get(m.as_str()).cloned().flatten(),
                Operand::Attribute(a) => attrs.get(a).and_then(Val::from_json),
            };
            match (l, Val::from_json(value)) {
                (Some(l), Some(r)) => Some(compare(&l, *op, &r)),
                _ => None,
            }
        }
    }
}

/// `all` in three-valued logic: false if a part is false, else unknown if
/// a part is unknown, else true.
fn all3(parts: impl Iterator<Item = Option<bool>>) -> Option<bool> {
    let mut unknown = false;
    for p in parts {
        match p {
            Some(false) => return Some(false),
            None => unknown = true,
            Some(true) => {}
        }
    }
    (!unknown).then_some(true)
}

fn points(it: &ScoreItem, v: Decimal) -> Decimal {
    if let Some(t) = &it.thresholds {
        for th in t {
            if th.min.is_none_or(|m| v >= dec(m)) {
                return dec(th.points);
            }
        }
        return Decimal::ZERO;
    }
    if let Some(l) = &it.linear {
        let (from, to) = (dec(l.from), dec(l.to));
        if from == to {
            return Decimal::ZERO;
        }
        let p = (v - from) / (to - from) * Decimal::from(100);
        return p.clamp(Decimal::ZERO, Decimal::from(100));
    }
    Decimal::ZERO
}

/// Evaluates a customer.
pub fn evaluate(cfg: &HealthConfig, inp: &Inputs) -> Evaluation {
    let mut notes = Vec::new();
    let mut values: HashMap<&str, Option<Val>> = HashMap::new();
    let mut why: HashMap<&str, Option<String>> = HashMap::new();
    for (name, m) in &cfg.measures {
        let (v, n) = measure(m, inp);
        values.insert(name, v);
        why.insert(name, n);
    }
    // The stage: an override in force, else the first rule that holds.
    let prev_stage = inp.previous.as_ref().and_then(|p| p.0.clone());
    let mut stage = None;
    let mut stage_rule = None;
    let mut reason = "none";
    let mut override_view = None;
    if let Some(o) = inp.override_row {
        if let Some(s) = o.stage.as_deref().filter(|_| o.until.is_none_or(|u| u > inp.at)) {
            override_view = Some(json!({"stage": s, "reason": o.reason, "until": o.until, "set_by": o.set_by, "set_at": o.set_at}));
            if cfg.stages.iter().any(|st| st.name == s) {
                stage = Some(s.to_owned());
                reason = "override";
                notes.push(format!(
                    "stage {s:?} is set by hand by {}{}{}",
                    o.set_by.as_deref().unwrap_or("an admin"),
                    o.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
                    o.until.map(|u| format!(" until {}", u.to_rfc3339())).unwrap_or_default()
                ));
            } else {
                notes.push(format!("the override to stage {s:?} is ignored: the configuration has no such stage"));
            }
        }
    }
    if stage.is_none() {
        for s in &cfg.stages {
            if holds(&s.rule, &values, inp.attributes) == Some(true) {
                stage = Some(s.name.clone());
                stage_rule = Some(s.rule.to_json());
                reason = "rule";
                break;
            }
        }
        if stage.is_none() {
            notes.push("no stage's rule holds".into());
        }
    }
    let same_stage = inp.previous.is_some() && prev_stage == stage;
    let stage_since = if same_stage { inp.previous.as_ref().and_then(|p| p.1).or(Some(inp.at)) } else { stage.as_ref().map(|_| inp.at) };
    // days_in_stage in the scorecard: of the stage just decided.
    if !same_stage {
        for (name, m) in &cfg.measures {
            if matches!(m, Measure::DaysInStage {}) {
                values.insert(name, stage.as_ref().map(|_| Val::Num(Decimal::ZERO)));
            }
        }
    }
    // The score.
    let card = stage.as_deref().and_then(|s| cfg.scorecard(s)).unwrap_or(&[]);
    let with_data: Vec<(&ScoreItem, Decimal)> =
        card.iter().filter_map(|it| values.get(it.measure.as_str()).cloned().flatten().and_then(|v| v.number()).map(|v| (it, v))).collect();
    let total_weight: Decimal = with_data.iter().map(|(it, _)| dec(it.weight)).sum();
    let mut results: Vec<MeasureResult> = Vec::new();
    let mut score = None;
    if card.is_empty() {
        if let Some(s) = &stage {
            notes.push(format!("stage {s:?} has no scorecard: no score"));
        }
    } else if total_weight.is_zero() {
        notes.push("no measure of the scorecard has data: no score".into());
    } else {
        let missing: Vec<&str> =
            card.iter().filter(|it| !with_data.iter().any(|(w, _)| std::ptr::eq(*w, *it))).map(|it| it.measure.as_str()).collect();
        if !missing.is_empty() {
            let missing_w: Decimal = card.iter().filter(|it| missing.contains(&it.measure.as_str())).map(|it| dec(it.weight)).sum();
            notes.push(format!(
                "{} {} no data; {} weight {} is shared among {} in proportion to their weights",
                missing.join(", "),
                if missing.len() == 1 { "has" } else { "have" },
                if missing.len() == 1 { "its" } else { "their" },
                missing_w.normalize(),
                with_data.iter().map(|(it, _)| it.measure.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        let mut sum = Decimal::ZERO;
        for it in card {
            let w = dec(it.weight);
            let v = values.get(it.measure.as_str()).cloned().flatten();
            let num = v.as_ref().and_then(Val::number);
            let (p, eff, contrib, note) = match num {
                Some(x) => {
                    let p = points(it, x).round_dp(4);
                    let eff = w / total_weight;
                    let c = (p * eff).round_dp(4);
                    sum += c;
                    (Some(p), Some(eff.round_dp(6)), Some(c), None)
                }
                None => (
                    None,
                    Some(Decimal::ZERO),
                    Some(Decimal::ZERO),
                    Some(match (&v, why.get(it.measure.as_str()).cloned().flatten()) {
                        (Some(_), _) => "not a number: no points; its weight is shared".to_owned(),
                        (None, Some(n)) => format!("no data ({n}); its weight is shared"),
                        (None, None) => "no data; its weight is shared".to_owned(),
                    }),
                ),
            };
            results.push(MeasureResult {
                name: it.measure.clone(),
                kind: cfg.measures.get(&it.measure).map(Measure::kind).unwrap_or(""),
                value: v,
                points: p,
                weight: Some(w),
                effective_weight: eff,
                contribution: contrib,
                note,
                in_scorecard: true,
            });
        }
        score = Some(sum.normalize());
    }
    for (name, m) in &cfg.measures {
        if results.iter().any(|r| &r.name == name) {
            continue;
        }
        // Not in the stage's scorecard: weight 0, adds 0.
        results.push(MeasureResult {
            name: name.clone(),
            kind: m.kind(),
            value: values.get(name.as_str()).cloned().flatten(),
            points: None,
            weight: Some(Decimal::ZERO),
            effective_weight: Some(Decimal::ZERO),
            contribution: Some(Decimal::ZERO),
            note: why.get(name.as_str()).cloned().flatten(),
            in_scorecard: false,
        });
    }
    let band = score.map(|s| {
        if s >= dec(cfg.bands.good) {
            "good"
        } else if s >= dec(cfg.bands.normal) {
            "normal"
        } else {
            "bad"
        }
    });
    let value = inp.attributes.get(&cfg.value_attribute).and_then(Val::from_json).and_then(|v| v.number()).unwrap_or(Decimal::ONE);
    let priority = score.map(|s| ((Decimal::from(100) - s) / Decimal::from(100) * value).round_dp(4).normalize());
    let today = local_date(inp.tz, inp.at);
    let mut next_change = local_start(inp.tz, today.checked_add_days(Days::new(1)).unwrap_or(today), 0);
    if let Some(u) = inp.override_row.and_then(|o| o.until).filter(|u| *u > inp.at) {
        next_change = next_change.min(u);
    }
    Evaluation {
        at: inp.at,
        stage,
        stage_rule,
        stage_reason: reason,
        stage_since,
        override_view,
        score,
        band,
        measures: results,
        notes,
        value,
        priority,
        next_change,
    }
}

/// A decimal as a JSON number: an integer when it is one, else the
/// nearest `f64` (the one definition behind [`num`] and the views).
struct Num(Decimal);

impl serde::Serialize for Num {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.0.normalize();
        if d.scale() == 0 {
            if let Some(i) = d.to_i64() {
                return s.serialize_i64(i);
            }
        }
        match d.to_f64() {
            Some(f) => s.serialize_f64(f),
            None => s.serialize_unit(),
        }
    }
}

/// A value as JSON (the one definition behind [`Val::to_json`] and the
/// views): a date as `YYYY-MM-DD`.
struct ValView<'a>(&'a Val);

impl serde::Serialize for ValView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Val::Num(d) => Num(*d).serialize(s),
            Val::Date(d) => s.collect_str(&d.format("%Y-%m-%d")),
            Val::Str(x) => s.serialize_str(x),
            Val::Bool(b) => s.serialize_bool(*b),
        }
    }
}

/// The API's view of an evaluation, serialized straight from it: a
/// recompute writes one per customer, and building it as a [`Value`] tree
/// first (a map per object, a string per key) cost more than the
/// evaluation. Fields in the order a [`Value`] map keeps them (sorted), so
/// the text is the same either way.
#[derive(serde::Serialize)]
struct View<'a> {
    as_of: DateTime<Utc>,
    band: Option<&'static str>,
    config_version: i64,
    customer_id: &'a str,
    explanation: &'a [String],
    measures: Vec<MeasureView<'a>>,
    next_change_at: DateTime<Utc>,
    #[serde(rename = "override")]
    override_view: &'a Option<Value>,
    priority: Option<Num>,
    score: Option<Num>,
    stage: &'a Option<String>,
    stage_reason: &'static str,
    stage_rule: &'a Option<Value>,
    stage_since: Option<DateTime<Utc>>,
    value: Num,
}

/// One measure of a [`View`].
#[derive(serde::Serialize)]
struct MeasureView<'a> {
    contribution: Option<Num>,
    effective_weight: Option<Num>,
    has_data: bool,
    in_scorecard: bool,
    kind: &'static str,
    name: &'a str,
    note: &'a Option<String>,
    points: Option<Num>,
    value: Option<ValView<'a>>,
    weight: Option<Num>,
}

impl Evaluation {
    fn view_of<'a>(&'a self, customer_id: &'a str, config_version: i64) -> View<'a> {
        View {
            as_of: self.at,
            band: self.band,
            config_version,
            customer_id,
            explanation: &self.notes,
            measures: self
                .measures
                .iter()
                .map(|m| MeasureView {
                    contribution: m.contribution.map(Num),
                    effective_weight: m.effective_weight.map(Num),
                    has_data: m.value.is_some(),
                    in_scorecard: m.in_scorecard,
                    kind: m.kind,
                    name: &m.name,
                    note: &m.note,
                    points: m.points.map(Num),
                    value: m.value.as_ref().map(ValView),
                    weight: m.weight.map(Num),
                })
                .collect(),
            next_change_at: self.next_change,
            override_view: &self.override_view,
            priority: self.priority.map(Num),
            score: self.score.map(Num),
            stage: &self.stage,
            stage_reason: self.stage_reason,
            stage_rule: &self.stage_rule,
            stage_since: self.stage_since,
            value: Num(self.value),
        }
    }

    /// The API's view (`GET /v1/customers/{id}/health`).
    pub fn view(&self, customer_id: &str, config_version: i64) -> Value {
        serde_json::to_value(self.view_of(customer_id, config_version)).unwrap_or(Value::Null)
    }

    /// [`Evaluation::view`] as JSON text, as the live row keeps it.
    pub fn view_text(&self, customer_id: &str, config_version: i64) -> Result<Box<serde_json::value::RawValue>, serde_json::Error> {
        serde_json::value::to_raw_value(&self.view_of(customer_id, config_version))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(v: Value) -> HealthConfig {
        HealthConfig::parse(&v).expect("valid")
    }

    /// The view as it was built before it was serialized straight from the
    /// evaluation: a `Value` tree from `json!` (the reference).
    fn view_as_value_tree(e: &Evaluation, customer_id: &str, config_version: i64) -> Value {
        // Numbers and values as `num` and `Val::to_json` built them before
        // they were defined through `Num` and `ValView`.
        let num = |d: Decimal| {
            let d = d.normalize();
            match d.to_i64().filter(|_| d.scale() == 0) {
                Some(i) => json!(i),
                None => d.to_f64().map(|f| json!(f)).unwrap_or(Value::Null),
            }
        };
        let to_json = |v: &Val| match v {
            Val::Num(d) => num(*d),
            Val::Date(d) => Value::String(d.format("%Y-%m-%d").to_string()),
            Val::Str(s) => Value::String(s.clone()),
            Val::Bool(b) => Value::Bool(*b),
        };
        let opt = |d: Option<Decimal>| d.map(num).unwrap_or(Value::Null);
        json!({
            "customer_id": customer_id,
            "as_of": e.at,
            "config_version": config_version,
            "stage": e.stage,
            "stage_rule": e.stage_rule,
            "stage_reason": e.stage_reason,
            "stage_since": e.stage_since,
            "override": e.override_view,
            "score": opt(e.score),
            "band": e.band,
            "value": num(e.value),
            "priority": opt(e.priority),
            "measures": e.measures.iter().map(|m| json!({
                "name": m.name,
                "kind": m.kind,
                "value": m.value.as_ref().map(to_json),
                "has_data": m.value.is_some(),
                "points": opt(m.points),
                "weight": opt(m.weight),
                "effective_weight": opt(m.effective_weight),
                "contribution": opt(m.contribution),
                "note": m.note,
                "in_scorecard": m.in_scorecard,
            })).collect::<Vec<_>>(),
            "explanation": e.notes,
            "next_change_at": e.next_change,
        })
    }

    #[test]
    fn the_view_is_the_same_text_as_the_value_tree_it_replaces() {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let m = |name: &str, value: Option<Val>, points: Option<&str>, note: Option<&str>| MeasureResult {
            name: name.into(),
            kind: "count",
            value,
            points: points.map(d),
            weight: Some(d("2.50")),
            effective_weight: Some(d("0.3333333333333333333333333333")),
            contribution: points.map(|p| d(p) * d("0.3333333333333333333333333333")),
            note: note.map(str::to_owned),
            in_scorecard: points.is_some(),
        };
        let full = Evaluation {
            at: t("2026-03-02T14:59:59.123456Z"),
            stage: Some("採用 \"adoption\"".into()),
            stage_rule: Some(json!({"all": [{"measure": "r", "op": "<", "value": 5}]})),
            stage_reason: "override",
            stage_since: Some(t("2026-01-01T00:00:00Z")),
            override_view: Some(json!({"stage": "x", "reason": "r", "until": null})),
            score: Some(d("73.3333")),
            band: Some("good"),
            measures: vec![
                m("int", Some(Val::Num(d("12.000"))), Some("100"), None),
                m("frac", Some(Val::Num(d("-0.125"))), Some("86.6667"), Some("a \"note\" 日本")),
                m("big", Some(Val::Num(Decimal::MAX)), Some("0"), None),
                m("date", Some(Val::Date(NaiveDate::from_ymd_opt(2027, 2, 28).unwrap())), None, None),
                m("text", Some(Val::Str("プラン\n\"x\"".into())), None, None),
                m("bool", Some(Val::Bool(false)), None, None),
                m("none", None, None, Some("no login event yet")),
            ],
            notes: vec!["one".into(), "二つ \"2\"".into()],
            value: d("48000.00"),
            priority: Some(d("12800.016")),
            next_change: t("2026-03-02T15:00:00Z"),
        };
        let empty = Evaluation {
            stage: None,
            stage_rule: None,
            stage_reason: "none",
            stage_since: None,
            override_view: None,
            score: None,
            band: None,
            measures: Vec::new(),
            notes: Vec::new(),
            value: d("1"),
            priority: None,
            ..full.clone()
        };
        for e in [&full, &empty] {
            let reference = view_as_value_tree(e, "c \"1\" 顧客", 7);
            assert_eq!(e.view("c \"1\" 顧客", 7), reference);
            assert_eq!(e.view_text("c \"1\" 顧客", 7).unwrap().get(), reference.to_string(), "the same text as stored before");
        }
    }

    /// One run of type `t` (user `u` each).
    fn run(t: &str, times: &[&str]) -> HealthEventRun {
        HealthEventRun {
            event_type: t.into(),
            ts: times.iter().map(|ts| DateTime::parse_from_rfc3339(ts).unwrap().timestamp_micros()).collect(),
            user_ids: vec![Some("u".into()); times.len()],
            properties: Vec::new(),
        }
    }

    #[test]
    fn windows_move_at_local_midnight_and_weights_are_shared() {
        let c = cfg(
            json!({"measures": {"r": {"kind": "count", "event_type": "x", "days": 2}, "idle": {"kind": "days_since_last", "event_type": "login"}},
            "stages": [{"name": "a", "rule": {"all": []}}],
            "scorecards": {"a": [{"measure": "r", "weight": 2, "thresholds": [{"min": 2, "points": 100}, {"min": null, "points": 10}]},
                                 {"measure": "idle", "weight": 1, "linear": {"from": 30, "to": 0}}]}}),
        );
        let tz: Tz = "Asia/Tokyo".parse().unwrap();
        // 2026-03-01 23:59 JST and 2026-03-02 00:00 JST.
        let events = vec![run("x", &["2026-02-28T15:00:00Z", "2026-03-01T14:59:00Z"])];
        let (ls, attrs, usage, included) = (HashMap::new(), Map::new(), HashMap::new(), HashMap::new());
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let inp = |t| Inputs {
            at: t,
            tz,
            events: &events,
            last_seen: &ls,
            attributes: &attrs,
            usage: &usage,
            included: &included,
            previous: None,
            override_row: None,
        };
        let e = evaluate(&c, &inp(at("2026-03-02T14:59:59Z")));
        // Both events are inside 2026-03-01..02 local.
        assert_eq!(e.measures.iter().find(|m| m.name == "r").unwrap().value, Some(Val::Num(Decimal::from(2))));
        assert_eq!(e.score, Some(Decimal::from(100)), "idle has no data: r carries the whole weight");
        let e = evaluate(&c, &inp(at("2026-03-02T15:00:00Z")));
        // 2026-03-03 00:00 JST: the window is 03-02..03-03, the first event left it.
        assert_eq!(e.measures.iter().find(|m| m.name == "r").unwrap().value, Some(Val::Num(Decimal::from(0))));
        assert_eq!(e.score, Some(Decimal::from(10)));
        assert_eq!(e.band, Some("bad"));
    }

    #[test]
    fn invalid_configurations_name_the_path() {
        let bad = |v: Value| HealthConfig::parse(&v).unwrap_err().to_string();
        let base = |stages: Value| json!({"measures": {"m": {"kind": "count", "days": 1}}, "stages": stages});
        assert!(bad(base(json!([{"name": "a", "rule": {"all": [{"measure": "nope", "op": "<", "value": 1}]}}])))
            .contains("stages[0].rule.all[0].measure"));
        assert!(bad(json!({"measures": {"m": {"kind": "count", "days": 0}}, "stages": []})).contains("measures.m.days"));
        let e = bad(json!({"measures": {"m": {"kind": "count", "days": 1}}, "stages": [{"name": "a", "rule": {"all": []}}],
            "scorecards": {"a": [{"measure": "m", "weight": 0, "linear": {"from": 0, "to": 1}}]}}));
        assert!(e.contains("scorecards.a") && e.contains("zero"), "{e}");
        // A version stored before zero weights were refused still loads
        // (one weight of zero beside others), all zeros never did.
        let two = json!({"measures": {"m": {"kind": "count", "days": 1}}, "stages": [{"name": "a", "rule": {"all": []}}],
            "scorecards": {"a": [{"measure": "m", "weight": 1, "linear": {"from": 0, "to": 1}}, {"measure": "m", "weight": 0, "linear": {"from": 0, "to": 1}}]}});
        assert!(bad(two.clone()).contains("scorecards.a[1].weight"));
        assert!(HealthConfig::load(&two).is_ok());
        let zeros = json!({"measures": {"m": {"kind": "count", "days": 1}}, "stages": [{"name": "a", "rule": {"all": []}}],
            "scorecards": {"a": [{"measure": "m", "weight": 0, "linear": {"from": 0, "to": 1}}]}});
        assert!(HealthConfig::load(&zeros).is_err());
        let e = bad(base(json!([{"name": "a", "rule": {"any": [{"not": {"measure": "m", "op": "~", "value": 1}}]}}])));
        assert!(e.contains("stages[0].rule.any[0].not.op"), "{e}");
    }
}
