//! Reads of many keys at once: a query with an `IN (…)` list, run for
//! every [`IN_CHUNK`] keys. Billing runs, health evaluations and the usage
//! of a batch of customers read this way (a few queries per 500 instead of
//! several per key).

use crate::{on_pool, Result, Store};

/// Rows fetched per `IN (…)` list: well under SQLite's limit on bound
/// parameters, and one round trip per 500 keys (subscriptions of a billing
/// run, customers of a health batch).
pub(crate) const IN_CHUNK: usize = 500;

/// `$from, $from+1, …` for `n` parameters.
pub(crate) fn placeholders(from: usize, n: usize) -> String {
    (from..from + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// A leading parameter of [`Store::select_in_after`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    /// A text value.
    Text(&'a str),
    /// An integer (a time in microseconds, a count).
    Int(i64),
}

/// The inside of an `IN (…)` over `keys`, the list's parameters numbered
/// from `from`, and what to bind for them: on PostgreSQL one parameter per
/// key; on SQLite one JSON array read with `json_each`, because SQLite
/// looks up each of a statement's named parameters (`$n`) in a list, so a
/// list of 500 cost O(n²) to prepare and bind (`crate::values_rows` says
/// more); anonymous `?` cannot be mixed with the statement's other `$n`.
pub(crate) fn in_list(sqlite: bool, from: usize, keys: &[&str]) -> (String, Vec<String>) {
    if sqlite {
        let json = serde_json::to_string(keys).unwrap_or_else(|_| "[]".to_owned());
        (format!("SELECT value FROM json_each(${from})"), vec![json])
    } else {
        (placeholders(from, keys.len()), keys.iter().map(|k| (*k).to_owned()).collect())
    }
}

/// The keys of an `{in}` list as the rows of a table `k` with one column
/// `value` (`FROM {keys}`), for a query that looks each key up on its own,
/// such as a correlated subquery per key: the list's rows on SQLite
/// ([`in_list`]'s `json_each`), `unnest` of its parameters on PostgreSQL.
pub(crate) fn key_rows(sqlite: bool) -> &'static str {
    if sqlite {
        "({in}) k"
    } else {
        "unnest(ARRAY[{in}]::text[]) AS k(value)"
    }
}

/// JSON text a query built (a packed page, an aggregate's array), as a
/// decoding error of the query when it is not what `T` expects.
pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(s: &str) -> std::result::Result<T, sqlx::Error> {
    serde_json::from_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

impl Store {
    /// The rows of `select` (a query whose `{in}` is replaced by the inside
    /// of an `IN (…)` list, see [`in_list`], and whose `$1` is the
    /// workspace) for every 500 of `keys`.
    pub(crate) async fn select_in<T>(&self, select: &str, workspace: &str, keys: &[&str]) -> Result<Vec<T>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        self.select_in_after(select, &[Arg::Text(workspace)], keys).await
    }

    /// [`Store::select_in`] with other leading parameters: `leading` are
    /// `$1…$n`, the list follows them.
    pub(crate) async fn select_in_after<T>(&self, select: &str, leading: &[Arg<'_>], keys: &[&str]) -> Result<Vec<T>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        let sqlite = matches!(self, Store::Sqlite(_));
        let mut out = Vec::new();
        for chunk in keys.chunks(IN_CHUNK) {
            let (list, binds) = in_list(sqlite, leading.len() + 1, chunk);
            let sql = select.replace("{in}", &list);
            // On PostgreSQL planned anew each time (an unnamed statement):
            // a cached generic plan made while a table was small (the
            // invoices a run is writing) kept scanning the whole table with
            // the 500-key filter on every batch as the table grew.
            let rows: Vec<T> = on_pool!(self, pool => {
                let mut q = sqlx::query_as(&sql).persistent(sqlite);
                for a in leading {
                    q = match *a {
                        Arg::Text(t) => q.bind(t),
                        Arg::Int(i) => q.bind(i),
                    };
                }
                for k in &binds {
                    q = q.bind(k);
                }
                q.fetch_all(pool).await
            })?;
            out.extend(rows);
        }
        Ok(out)
    }

    /// [`Store::select_in_after`] for many rows: on SQLite the rows of each
    /// chunk of keys come back packed in one row, a JSON array of arrays of
    /// `columns` (the columns of `select`, in its order), in no particular
    /// order. sqlx passes every SQLite row from its worker thread through a
    /// channel, with a wake-up and a lock of the connection to free it: the
    /// ~28,000 events of a health batch spent most of a recompute's time
    /// there (metering's bucket pages do the same). On PostgreSQL the rows
    /// as they are.
    pub(crate) async fn select_in_packed<T>(&self, select: &str, columns: &str, leading: &[Arg<'_>], keys: &[&str]) -> Result<Vec<T>>
    where
        T: serde::de::DeserializeOwned
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + Send
            + Unpin,
    {
        match self {
            Store::Sqlite(_) => {
                let packed = format!("SELECT json_group_array(json_array({columns})) FROM ({select}) packed");
                let pages: Vec<(String,)> = self.select_in_after(&packed, leading, keys).await?;
                let mut out = Vec::new();
                for (page,) in pages {
                    out.extend(decode_json::<Vec<T>>(&page)?);
                }
                Ok(out)
            }
            Store::Postgres(_) => self.select_in_after(select, leading, keys).await,
        }
    }
}
