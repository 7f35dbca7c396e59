//! Filters of a query that the loading of a live table can apply before
//! DataFusion sees the rows, so that `SELECT … FROM usage WHERE customer_id
//! = 'acme'` reads one customer's buckets from the state store, not every
//! bucket of the workspace.
//!
//! # Why from the SQL text, not from DataFusion's plan
//!
//! The live tables are read in the server process and sent to the query's
//! worker process (see [`crate::sandbox`]); planning a query folds its
//! constants, which can allocate without bound, so the server never plans a
//! query itself. The filters are therefore read from the parsed statement
//! (the parser's syntax tree, no evaluation) and only in the one shape where
//! they provably restrict every row the query reads from the table: the
//! table is named exactly once in the whole statement, as the only relation
//! of a plain `SELECT` (no join, no CTE, no set operation), and the filter is
//! a conjunct of that `SELECT`'s `WHERE`: `column = 'text'`, or a time column
//! compared with an RFC 3339 literal with an offset (`>`, `>=`, `<`, `<=`,
//! `BETWEEN`). Anything else loads the table unfiltered (bounded by
//! `sql.max_live_rows`). The pushed filters are *inexact*: DataFusion applies
//! every filter of the query again, so a time bound is widened by a bucket on
//! each side and an equality on a column the loader maps (an empty customer
//! id is NULL in SQL) can only let more rows through, never fewer.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use datafusion::sql::sqlparser::ast::{
    visit_relations, BinaryOperator, Expr, ObjectName, SetExpr, Statement, TableFactor, TypedString, Value, ValueWithSpan,
};

/// What every row a query reads from one live table satisfies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveFilter {
    /// `column = 'text'` conjuncts (lower-case column names).
    pub equals: BTreeMap<String, String>,
    /// The time column is at or after this.
    pub from: Option<DateTime<Utc>>,
    /// The time column is at or before this.
    pub until: Option<DateTime<Utc>>,
}

impl LiveFilter {
    /// The text a column must equal, if the query says so.
    pub fn eq(&self, column: &str) -> Option<&str> {
        self.equals.get(column).map(String::as_str)
    }
}

/// The filters of `statement` on `table` (whose time column is `time`),
/// or none when the statement is not of the one shape read (module docs).
pub fn live_filter(statement: &Statement, table: &str, time: &str) -> LiveFilter {
    let named = |n: &ObjectName| n.0.last().and_then(|p| p.as_ident()).is_some_and(|i| i.value.eq_ignore_ascii_case(table));
    let mut mentions = 0;
    let _ = visit_relations(statement, |r| {
        if named(r) {
            mentions += 1;
        }
        ControlFlow::<()>::Continue(())
    });
    if mentions != 1 {
        return LiveFilter::default();
    }
    let Statement::Query(q) = statement else { return LiveFilter::default() };
    if q.with.is_some() {
        return LiveFilter::default();
    }
    let SetExpr::Select(select) = q.body.as_ref() else { return LiveFilter::default() };
    let [from] = select.from.as_slice() else { return LiveFilter::default() };
    if !from.joins.is_empty() {
        return LiveFilter::default();
    }
    let TableFactor::Table { name, alias, args: None, .. } = &from.relation else { return LiveFilter::default() };
    if !named(name) {
        return LiveFilter::default();
    }
    let qualifier = alias.as_ref().map_or_else(|| table.to_owned(), |a| a.name.value.to_ascii_lowercase());
    let mut filter = LiveFilter::default();
    if let Some(selection) = &select.selection {
        let mut conjuncts = Vec::new();
        split_and(selection, &mut conjuncts);
        for c in conjuncts {
            apply(c, &qualifier, time, &mut filter);
        }
    }
    filter
}

fn split_and<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            split_and(left, out);
            split_and(right, out);
        }
        Expr::Nested(inner) => split_and(inner, out),
        other => out.push(other),
    }
}

/// The column an expression names (unqualified, or qualified by the
/// table's name or alias), lower-cased.
fn column(e: &Expr, qualifier: &str) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(i.value.to_ascii_lowercase()),
        Expr::CompoundIdentifier(parts) if parts.len() == 2 && parts[0].value.eq_ignore_ascii_case(qualifier) => {
            Some(parts[1].value.to_ascii_lowercase())
        }
        Expr::Nested(inner) => column(inner, qualifier),
        _ => None,
    }
}

fn text(e: &Expr) -> Option<&str> {
    match e {
        Expr::Value(ValueWithSpan { value: Value::SingleQuotedString(s), .. }) => Some(s),
        Expr::TypedString(TypedString { value: ValueWithSpan { value: Value::SingleQuotedString(s), .. }, .. }) => Some(s),
        Expr::Nested(inner) => text(inner),
        _ => None,
    }
}

/// An RFC 3339 time with an explicit offset: the one form whose instant
/// does not depend on how DataFusion reads a time without one.
fn instant(e: &Expr) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text(e)?).ok().map(|t| t.with_timezone(&Utc))
}

fn apply(c: &Expr, qualifier: &str, time: &str, f: &mut LiveFilter) {
    match c {
        Expr::BinaryOp { left, op, right } => {
            // `column op literal`, or `literal op column` (mirrored).
            let (col, lit, op) = match (column(left, qualifier), column(right, qualifier)) {
                (Some(col), None) => (col, right.as_ref(), op.clone()),
                (None, Some(col)) => {
                    let mirrored = match op {
                        BinaryOperator::Lt => BinaryOperator::Gt,
                        BinaryOperator::LtEq => BinaryOperator::GtEq,
                        BinaryOperator::Gt => BinaryOperator::Lt,
                        BinaryOperator::GtEq => BinaryOperator::LtEq,
                        other => other.clone(),
                    };
                    (col, left.as_ref(), mirrored)
                }
                _ => return,
            };
            if col == time {
                let Some(t) = instant(lit) else { return };
                match op {
                    BinaryOperator::Gt | BinaryOperator::GtEq => f.from = Some(f.from.map_or(t, |x| x.max(t))),
                    BinaryOperator::Lt | BinaryOperator::LtEq => f.until = Some(f.until.map_or(t, |x| x.min(t))),
                    BinaryOperator::Eq => {
                        f.from = Some(f.from.map_or(t, |x| x.max(t)));
                        f.until = Some(f.until.map_or(t, |x| x.min(t)));
                    }
                    _ => {}
                }
            } else if op == BinaryOperator::Eq {
                if let Some(v) = text(lit) {
                    f.equals.insert(col, v.to_owned());
                }
            }
        }
        Expr::Between { expr, negated: false, low, high } if column(expr, qualifier).as_deref() == Some(time) => {
            if let (Some(lo), Some(hi)) = (instant(low), instant(high)) {
                f.from = Some(f.from.map_or(lo, |x| x.max(lo)));
                f.until = Some(f.until.map_or(hi, |x| x.min(hi)));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn filter(sql: &str) -> LiveFilter {
        let state = datafusion::execution::SessionStateBuilder::new().build();
        let statement = state.sql_to_statement(sql, &datafusion::config::Dialect::Generic).unwrap();
        let datafusion::sql::parser::Statement::Statement(s) = statement else { panic!("not a statement") };
        live_filter(&s, "usage", "period_start")
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn conjuncts_of_a_plain_select_are_pushed() {
        let f = filter(
            "SELECT sum(value) FROM usage u WHERE u.customer_id = 'acme' AND meter = 'gb' \
             AND period_start >= '2024-05-01T00:00:00+09:00' AND '2024-06-01T00:00:00Z' > u.period_start",
        );
        assert_eq!(f.eq("customer_id"), Some("acme"));
        assert_eq!(f.eq("meter"), Some("gb"));
        assert_eq!(f.from, Some(t("2024-04-30T15:00:00Z")));
        assert_eq!(f.until, Some(t("2024-06-01T00:00:00Z")));
        let f = filter("SELECT * FROM usage WHERE period_start BETWEEN TIMESTAMP '2024-05-01T00:00:00Z' AND '2024-05-02T00:00:00Z'");
        assert_eq!((f.from, f.until), (Some(t("2024-05-01T00:00:00Z")), Some(t("2024-05-02T00:00:00Z"))));
    }

    #[test]
    fn anything_that_might_not_restrict_every_row_is_not_pushed() {
        for sql in [
            // OR: either side may hold.
            "SELECT * FROM usage WHERE customer_id = 'a' OR meter = 'gb'",
            // The table twice: the filter holds for one of them only.
            "SELECT * FROM usage a JOIN usage b ON a.meter = b.meter WHERE a.customer_id = 'x'",
            "SELECT * FROM usage WHERE customer_id = 'a' UNION ALL SELECT * FROM usage",
            // Named in a subquery of another relation.
            "SELECT * FROM meters WHERE key IN (SELECT meter FROM usage WHERE customer_id = 'a')",
            // A CTE may read the table in ways the outer WHERE does not cover.
            "WITH u AS (SELECT * FROM usage) SELECT * FROM u WHERE customer_id = 'a'",
            // Another table's column.
            "SELECT * FROM usage JOIN customers c ON c.customer_id = usage.customer_id WHERE c.customer_id = 'a'",
            // NOT, and functions of the column.
            "SELECT * FROM usage WHERE NOT (customer_id = 'a')",
            "SELECT * FROM usage WHERE lower(customer_id) = 'a'",
        ] {
            assert_eq!(filter(sql), LiveFilter::default(), "{sql}");
        }
        // A time without an offset is left to DataFusion.
        assert_eq!(filter("SELECT * FROM usage WHERE period_start >= '2024-05-01 00:00:00'").from, None);
    }
}
