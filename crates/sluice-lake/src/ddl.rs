//! Table definitions for other engines reading the same lake
//! (`sluice lake ddl --engine athena|trino|duckdb|spark`,
//! `GET /v1/lake/ddl?engine=`).
//!
//! All of them see the same Hive layout: partition columns `workspace`,
//! `content_type`, `year`, `month`, `day`, `hour` (strings, as in the
//! paths: `year=2026/month=01/…`). Files of one event type may lack the
//! typed `p_*` columns of another (or of an older schema): engines read
//! them as null (`union_by_name` in DuckDB).
//!
//! Athena uses partition projection, so no crawler and no `MSCK REPAIR`
//! are needed: `workspace` and `content_type` are `enum` projections of
//! the values known when the DDL was printed (print it again after new
//! event types appear), the time parts are `integer` projections with
//! leading zeros, and `storage.location.template` spells the layout.

use arrow::datatypes::{DataType, SchemaRef};

use crate::LakeError;

/// Engines with a DDL.
pub const ENGINES: [&str; 4] = ["athena", "trino", "duckdb", "spark"];

/// Everything a DDL needs.
pub struct DdlInput<'a> {
    /// `athena`, `trino`, `duckdb` or `spark`.
    pub engine: &'a str,
    /// The file schema (base and typed columns).
    pub schema: SchemaRef,
    /// Lake location as the engine sees it (e.g. `s3://bucket/lake`, or a local path for DuckDB).
    pub location: &'a str,
    /// The workspace.
    pub workspace: &'a str,
    /// Event types present (for Athena's enum projection).
    pub content_types: Vec<String>,
    /// Table name.
    pub table: &'a str,
}

fn hive_type(t: &DataType) -> &'static str {
    match t {
        DataType::Int64 => "bigint",
        DataType::Float64 => "double",
        DataType::Boolean => "boolean",
        DataType::Timestamp(..) => "timestamp",
        _ => "string",
    }
}

fn trino_type(t: &DataType) -> &'static str {
    match t {
        DataType::Int64 => "bigint",
        DataType::Float64 => "double",
        DataType::Boolean => "boolean",
        DataType::Timestamp(..) => "timestamp(6) with time zone",
        _ => "varchar",
    }
}

/// The DDL text, or why not.
pub fn ddl(i: &DdlInput) -> Result<String, LakeError> {
    let loc = i.location.trim_end_matches('/');
    let parts = ["workspace", "content_type", "year", "month", "day", "hour"];
    let cols = |f: &dyn Fn(&DataType) -> &'static str, quote: char| -> String {
        i.schema.fields().iter().map(|fl| format!("  {quote}{}{quote} {}", fl.name(), f(fl.data_type()))).collect::<Vec<_>>().join(",\n")
    };
    Ok(match i.engine {
        "athena" => {
            let types = if i.content_types.is_empty() { "REPLACE_WITH_EVENT_TYPES".to_owned() } else { i.content_types.join(",") };
            format!(
                "-- Athena (partition projection: no crawler, no MSCK REPAIR). Print again after new event types appear.\n\
                 CREATE EXTERNAL TABLE IF NOT EXISTS {t} (\n{c}\n)\n\
                 PARTITIONED BY (workspace string, content_type string, year string, month string, day string, hour string)\n\
                 STORED AS PARQUET\n\
                 LOCATION '{loc}/'\n\
                 TBLPROPERTIES (\n\
                 \x20 'projection.enabled' = 'true',\n\
                 \x20 'projection.workspace.type' = 'enum',\n\
                 \x20 'projection.workspace.values' = '{ws}',\n\
                 \x20 'projection.content_type.type' = 'enum',\n\
                 \x20 'projection.content_type.values' = '{types}',\n\
                 \x20 'projection.year.type' = 'integer',\n\
                 \x20 'projection.year.range' = '2020,2100',\n\
                 \x20 'projection.year.digits' = '4',\n\
                 \x20 'projection.month.type' = 'integer',\n\
                 \x20 'projection.month.range' = '1,12',\n\
                 \x20 'projection.month.digits' = '2',\n\
                 \x20 'projection.day.type' = 'integer',\n\
                 \x20 'projection.day.range' = '1,31',\n\
                 \x20 'projection.day.digits' = '2',\n\
                 \x20 'projection.hour.type' = 'integer',\n\
                 \x20 'projection.hour.range' = '0,23',\n\
                 \x20 'projection.hour.digits' = '2',\n\
                 \x20 'storage.location.template' = '{loc}/workspace=${{workspace}}/content_type=${{content_type}}/year=${{year}}/month=${{month}}/day=${{day}}/hour=${{hour}}/'\n\
                 );\n",
                t = i.table,
                c = cols(&hive_type, '`'),
                ws = i.workspace,
            )
        }
        "trino" => format!(
            "-- Trino (Hive connector). Register partitions after new ones appear:\n\
             --   CALL system.sync_partition_metadata('sluice', '{t}', 'ADD');\n\
             CREATE TABLE IF NOT EXISTS hive.sluice.{t} (\n{c},\n{p}\n)\n\
             WITH (\n  format = 'PARQUET',\n  external_location = '{loc}/',\n  partitioned_by = ARRAY[{pl}]\n);\n\
             CALL system.sync_partition_metadata('sluice', '{t}', 'ADD');\n",
            t = i.table,
            c = cols(&trino_type, '"'),
            p = parts.iter().map(|p| format!("  \"{p}\" varchar")).collect::<Vec<_>>().join(",\n"),
            pl = parts.iter().map(|p| format!("'{p}'")).collect::<Vec<_>>().join(", "),
        ),
        "duckdb" => format!(
            "-- DuckDB: a view over the files of workspace `{ws}` (Hive partitions, schemas unified by name).\n\
             CREATE OR REPLACE VIEW {t} AS\n\
             SELECT * FROM read_parquet('{loc}/workspace={ws}/*/*/*/*/*/*.parquet', hive_partitioning = true, union_by_name = true,\n\
             \x20   hive_types = {{'workspace': VARCHAR, 'content_type': VARCHAR, 'year': VARCHAR, 'month': VARCHAR, 'day': VARCHAR, 'hour': VARCHAR}});\n",
            t = i.table,
            ws = i.workspace,
        ),
        "spark" => format!(
            "-- Spark SQL. Register partitions after new ones appear: MSCK REPAIR TABLE {t};\n\
             CREATE TABLE IF NOT EXISTS {t} (\n{c},\n{p}\n)\n\
             USING PARQUET\n\
             PARTITIONED BY ({pl})\n\
             LOCATION '{loc}/';\n\
             MSCK REPAIR TABLE {t};\n",
            t = i.table,
            c = cols(&hive_type, '`'),
            p = parts.iter().map(|p| format!("  `{p}` string")).collect::<Vec<_>>().join(",\n"),
            pl = parts.join(", "),
        ),
        other => return Err(LakeError::UnknownEngine(other.to_owned())),
    })
}
