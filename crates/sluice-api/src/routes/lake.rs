//! The lake and SQL: `POST /v1/sql`, declared property schemas
//! (`/v1/schemas`), lake files and compaction (`/v1/lake/…`), saved queries
//! and scheduled exports (`/v1/queries`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice_ingest::PropertyType;
use sluice_lake::sql::{Access, Format, SqlError};
use sluice_store::{EventSchema, SavedQuery, StoreError};

use super::jobs::JobView;
use super::{rfc3339, List};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::json::Json;
use crate::state::AppState;

impl From<SqlError> for ApiError {
    fn from(e: SqlError) -> Self {
        match e {
            SqlError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_sql", m),
            SqlError::ReadOnly(m) => ApiError::new(StatusCode::BAD_REQUEST, "read_only", m),
            SqlError::Timeout(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "query_timeout", e.to_string()),
            SqlError::TooLarge(m) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "result_too_large", m),
            SqlError::Forbidden(m) => ApiError::forbidden(m),
            SqlError::OutOfRange(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "value_out_of_range", m),
            SqlError::Internal(m) => ApiError::internal(m),
        }
    }
}

fn lake(st: &AppState) -> Result<&crate::state::LakeHandle, ApiError> {
    st.lake.as_ref().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the lake is not running"))
}

/// Body of `POST /v1/sql`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    /// One read-only SQL statement.
    pub query: String,
    /// `json` (default), `csv`, `arrow` (IPC stream) or `parquet`.
    pub format: Option<String>,
}

/// Runs SQL over the workspace's `events` and live state tables.
#[utoipa::path(post, path = "/v1/sql", tag = "sql", request_body = SqlRequest,
    responses((status = 200, description = "the result in the requested format"), (status = 400), (status = 403), (status = 413), (status = 422)),
    security(("bearer" = [])))]
pub async fn sql(State(st): State<AppState>, who: Principal, Json(body): Json<SqlRequest>) -> Result<Response, ApiError> {
    who.require_read()?;
    let format = match body.format.as_deref() {
        None => Format::Json,
        Some(f) => Format::parse(f).ok_or_else(|| ApiError::bad_request(format!("format: {f:?} is not one of json, csv, arrow, parquet")))?,
    };
    if body.query.trim().is_empty() {
        return Err(ApiError::bad_request("query: must not be empty"));
    }
    let lake = lake(&st)?;
    // Scopes in SQL equal scopes in REST: `audit_log` needs an admin key.
    let access = if who.scope.can_admin() { Access::Admin } else { Access::Read };
    let result = lake.sql.query_as(who.workspace.as_str(), &body.query, access).await?;
    let bytes = tokio::task::spawn_blocking(move || sluice_lake::sql::encode(&result, format)).await.map_err(ApiError::internal)??;
    Ok(([(header::CONTENT_TYPE, format.content_type())], Body::from(bytes)).into_response())
}

fn schema_view(s: &EventSchema) -> Value {
    let props: Map<String, Value> = s.properties.iter().map(|(n, t)| (n.clone(), Value::String(t.clone()))).collect();
    let columns: Map<String, Value> = s.properties.iter().map(|(n, _)| (n.clone(), Value::String(sluice_lake::columns::typed_column(n)))).collect();
    json!({"event_type": s.event_type, "properties": props, "enforce": s.enforce, "columns": columns, "updated_at": rfc3339(s.updated_at)})
}

/// Declares the property types of an event type. Body:
/// `{"properties": {"amount": "float64", …}, "enforce": true}` (or just the
/// properties object). Types: `int64`, `float64`, `bool`, `string`,
/// `timestamp`.
#[utoipa::path(put, path = "/v1/schemas/{type}", tag = "lake", responses((status = 200), (status = 400), (status = 409)), security(("bearer" = [])))]
pub async fn put_schema(
    State(st): State<AppState>,
    who: Principal,
    Path(event_type): Path<String>,
    Json(body): Json<Value>,
) -> Result<Json<Value>, ApiError> {
    who.require_admin()?;
    sluice_core::EventType::parse(event_type.clone())
        .or_else(|_| sluice_core::EventType::from_name(event_type.clone()))
        .map_err(|e| ApiError::bad_request(format!("event type {event_type:?}: {}", e.0)))?;
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object: {\"properties\": {\"name\": \"int64\"}, \"enforce\": true}"))?;
    let (props, enforce) = match obj.get("properties") {
        Some(Value::Object(p)) => {
            if let Some(k) = obj.keys().find(|k| *k != "properties" && *k != "enforce") {
                return Err(ApiError::bad_request(format!("{k}: unknown field (expected properties, enforce)")));
            }
            let enforce = match obj.get("enforce") {
                None => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(ApiError::bad_request("enforce: must be true or false")),
            };
            (p.clone(), enforce)
        }
        Some(_) => return Err(ApiError::bad_request("properties: must be an object of property name → type")),
        None => (obj.clone(), true),
    };
    if props.is_empty() {
        return Err(ApiError::bad_request("properties: declare at least one property"));
    }
    let mut declared = Vec::new();
    for (name, t) in &props {
        if name.is_empty() || name.len() > 128 {
            return Err(ApiError::bad_request(format!("properties.{name}: a property name has 1 to 128 characters")));
        }
        let ty = t
            .as_str()
            .and_then(PropertyType::parse)
            .ok_or_else(|| ApiError::bad_request(format!("properties.{name}: {t} is not one of int64, float64, bool, string, timestamp")))?;
        declared.push((name.clone(), ty.name().to_owned()));
    }
    // One typed column, one property: two names that map to the same column
    // (`a-b` and `a_b` → `p_a_b`) would give the lake two columns of one
    // name, and every query on `events` would fail. The typed columns are
    // shared by all event types of the workspace, so this holds within the
    // schema and against every other event type's properties, whatever
    // their types; the same name may appear in several event types if it
    // has the same type there.
    let collision = |a: &str, b: &str, col: &str, other: Option<&str>| {
        let where_ = other.map(|t| format!(" (declared for event type `{t}`)")).unwrap_or_default();
        ApiError::new(
            StatusCode::CONFLICT,
            "column_collision",
            format!("properties.{a} and properties.{b}{where_} both map to column {col}; a column holds one property: rename one of them"),
        )
    };
    for (i, (n, _)) in declared.iter().enumerate() {
        let col = sluice_lake::columns::typed_column(n);
        if let Some((n2, _)) = declared[..i].iter().find(|(n2, _)| sluice_lake::columns::typed_column(n2) == col) {
            return Err(collision(n2, n, &col, None));
        }
    }
    let existing = st.store.event_schemas(Some(who.workspace.as_str())).await?;
    for other in &existing {
        if other.event_type == event_type {
            continue;
        }
        for (n, t) in &declared {
            let col = sluice_lake::columns::typed_column(n);
            for (n2, t2) in &other.properties {
                if n2 == n && t2 != t {
                    return Err(ApiError::conflict(format!(
                        "properties.{n}: declared as {t2} for event type `{}`; column {col} can have one type only",
                        other.event_type
                    )));
                }
                if n2 != n && sluice_lake::columns::typed_column(n2) == col {
                    return Err(collision(n, n2, &col, Some(&other.event_type)));
                }
            }
        }
    }
    let limit = st.limits.workspace.schemas;
    if !existing.iter().any(|s| s.event_type == event_type) && existing.len() >= limit {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "limit_exceeded",
            format!("this workspace has {} schemas, the most allowed (limits.schemas = {limit}); delete one or raise the limit", existing.len()),
        ));
    }
    let schema = EventSchema {
        workspace: who.workspace.to_string(),
        event_type: event_type.clone(),
        properties: declared,
        enforce,
        updated_at: chrono::Utc::now(),
    };
    st.store.put_event_schema(&schema).await?;
    lake(&st)?.schemas.set(&schema);
    audit(&st, &who, "schema.put", "schema", &event_type, json!({"properties": props, "enforce": enforce})).await;
    Ok(Json(schema_view(&schema)))
}

/// Declared schemas of the workspace.
#[utoipa::path(get, path = "/v1/schemas", tag = "lake", responses((status = 200)), security(("bearer" = [])))]
pub async fn list_schemas(State(st): State<AppState>, who: Principal) -> Result<Json<List<Value>>, ApiError> {
    who.require_read()?;
    let all = st.store.event_schemas(Some(who.workspace.as_str())).await?;
    Ok(Json(List { data: all.iter().map(schema_view).collect(), next_cursor: None }))
}

/// One event type's schema.
#[utoipa::path(get, path = "/v1/schemas/{type}", tag = "lake", responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn get_schema(State(st): State<AppState>, who: Principal, Path(event_type): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let all = st.store.event_schemas(Some(who.workspace.as_str())).await?;
    all.iter()
        .find(|s| s.event_type == event_type)
        .map(|s| Json(schema_view(s)))
        .ok_or_else(|| ApiError::not_found(format!("no schema for event type {event_type:?}")))
}

/// Removes an event type's schema (its typed columns stay in files already written).
#[utoipa::path(delete, path = "/v1/schemas/{type}", tag = "lake", responses((status = 204), (status = 404)), security(("bearer" = [])))]
pub async fn delete_schema(State(st): State<AppState>, who: Principal, Path(event_type): Path<String>) -> Result<StatusCode, ApiError> {
    who.require_admin()?;
    st.store.delete_event_schema(who.workspace.as_str(), &event_type).await.map_err(|e| match e {
        StoreError::NotFound => ApiError::not_found(format!("no schema for event type {event_type:?}")),
        o => o.into(),
    })?;
    lake(&st)?.schemas.remove(who.workspace.as_str(), &event_type);
    audit(&st, &who, "schema.delete", "schema", &event_type, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// The lake's committed files of the workspace.
#[utoipa::path(get, path = "/v1/lake/files", tag = "lake", responses((status = 200)), security(("bearer" = [])))]
pub async fn files(State(st): State<AppState>, who: Principal) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let files = st.store.lake_files(Some(who.workspace.as_str())).await?;
    let data: Vec<Value> = files
        .iter()
        .map(|f| {
            json!({"path": f.path, "content_type": f.content_type, "hour": rfc3339(f.hour_start), "rows": f.row_count,
                   "bytes": f.bytes, "min_timestamp": rfc3339(f.min_time), "max_timestamp": rfc3339(f.max_time),
                   "created_at": rfc3339(f.created_at)})
        })
        .collect();
    // Paths are relative to the lake root; the server's own paths are not
    // shown.
    lake(&st)?;
    Ok(Json(json!({"data": data})))
}

/// Starts a compaction job for the workspace.
#[utoipa::path(post, path = "/v1/lake/compact", tag = "lake", responses((status = 202)), security(("bearer" = [])))]
pub async fn compact(State(st): State<AppState>, who: Principal) -> Result<(StatusCode, Json<JobView>), ApiError> {
    who.require_admin()?;
    let job = st
        .store
        .enqueue_job(&sluice_store::NewJob {
            workspace: who.workspace.to_string(),
            kind: sluice_lake::compact::KIND.into(),
            payload: sluice_jobs::JobPayload::to_value(&sluice_lake::compact::CompactPayload { v: 1, workspace: Some(who.workspace.to_string()) }),
            max_attempts: 3,
            created_by: Some(who.key_id.clone()),
        })
        .await?;
    st.jobs.wake();
    audit(&st, &who, "lake.compact", "job", &job.id, json!({})).await;
    Ok((StatusCode::ACCEPTED, Json(JobView::from(job))))
}

/// Body of `POST /v1/queries`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// Name, 1–64 of `A-Z a-z 0-9 _ - .`.
    pub name: String,
    /// The SQL.
    pub sql: String,
    /// Cron schedule (5 fields, UTC), e.g. `0 * * * *`.
    pub schedule: Option<String>,
    /// Export: `{"format": "parquet"|"csv", "path": "daily/signups.parquet"}` under `<lake>/exports/<workspace>/`.
    #[schema(value_type = Object)]
    pub export: Option<Value>,
}

fn query_view(q: &SavedQuery) -> Value {
    json!({"name": q.name, "sql": q.sql, "schedule": q.schedule, "export": q.export,
           "next_run_at": q.next_run_at.map(rfc3339), "created_at": rfc3339(q.created_at), "updated_at": rfc3339(q.updated_at)})
}

/// Saves a query (replacing one of the same name).
#[utoipa::path(post, path = "/v1/queries", tag = "sql", request_body = QueryRequest, responses((status = 201), (status = 400), (status = 409)), security(("bearer" = [])))]
pub async fn create_query(State(st): State<AppState>, who: Principal, Json(body): Json<QueryRequest>) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require_admin()?;
    if body.name.is_empty() || body.name.len() > 64 || !body.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
        return Err(ApiError::bad_request("name: 1 to 64 of A-Z a-z 0-9 _ - ."));
    }
    if body.sql.trim().is_empty() {
        return Err(ApiError::bad_request("sql: must not be empty"));
    }
    let next_run_at = match &body.schedule {
        None => None,
        Some(s) => Some(sluice_lake::export::next_run(s, chrono::Utc::now()).map_err(|e| ApiError::bad_request(format!("schedule: {e}")))?),
    };
    if let Some(e) = &body.export {
        sluice_lake::export::ExportSpec::parse(e).map_err(|e| ApiError::bad_request(format!("export: {e}")))?;
    }
    let limit = st.limits.workspace.saved_queries;
    let existing = st.store.saved_queries(Some(who.workspace.as_str())).await?;
    if !existing.iter().any(|q| q.name == body.name) && existing.len() >= limit {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "limit_exceeded",
            format!(
                "this workspace has {} saved queries, the most allowed (limits.saved_queries = {limit}); delete one or raise the limit",
                existing.len()
            ),
        ));
    }
    // Check the SQL now (plans it in a worker, with the tables' schemas).
    lake(&st)?.sql.check(who.workspace.as_str(), &body.sql).await?;
    let now = chrono::Utc::now();
    let q = SavedQuery {
        workspace: who.workspace.to_string(),
        name: body.name.clone(),
        sql: body.sql,
        schedule: body.schedule,
        export: body.export,
        next_run_at,
        created_at: now,
        updated_at: now,
    };
    st.store.put_saved_query(&q).await?;
    audit(&st, &who, "query.save", "query", &q.name, json!({"schedule": q.schedule, "export": q.export})).await;
    Ok((StatusCode::CREATED, Json(query_view(&q))))
}

/// Saved queries.
#[utoipa::path(get, path = "/v1/queries", tag = "sql", responses((status = 200)), security(("bearer" = [])))]
pub async fn list_queries(State(st): State<AppState>, who: Principal) -> Result<Json<List<Value>>, ApiError> {
    who.require_read()?;
    let all = st.store.saved_queries(Some(who.workspace.as_str())).await?;
    Ok(Json(List { data: all.iter().map(query_view).collect(), next_cursor: None }))
}

fn query_not_found(name: &str) -> impl Fn(StoreError) -> ApiError + '_ {
    move |e| match e {
        StoreError::NotFound => ApiError::not_found(format!("no saved query named {name:?}")),
        o => o.into(),
    }
}

/// One saved query.
#[utoipa::path(get, path = "/v1/queries/{name}", tag = "sql", responses((status = 200), (status = 404)), security(("bearer" = [])))]
pub async fn get_query(State(st): State<AppState>, who: Principal, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    who.require_read()?;
    let q = st.store.saved_query(who.workspace.as_str(), &name).await.map_err(query_not_found(&name))?;
    Ok(Json(query_view(&q)))
}

/// Deletes a saved query.
#[utoipa::path(delete, path = "/v1/queries/{name}", tag = "sql", responses((status = 204), (status = 404)), security(("bearer" = [])))]
pub async fn delete_query(State(st): State<AppState>, who: Principal, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    who.require_admin()?;
    st.store.delete_saved_query(who.workspace.as_str(), &name).await.map_err(query_not_found(&name))?;
    audit(&st, &who, "query.delete", "query", &name, json!({})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a saved query now, as a job (its export, if any, is written).
#[utoipa::path(post, path = "/v1/queries/{name}/run", tag = "sql", responses((status = 202), (status = 404)), security(("bearer" = [])))]
pub async fn run_query(State(st): State<AppState>, who: Principal, Path(name): Path<String>) -> Result<(StatusCode, Json<JobView>), ApiError> {
    who.require_admin()?;
    st.store.saved_query(who.workspace.as_str(), &name).await.map_err(query_not_found(&name))?;
    let job = st
        .store
        .enqueue_job(&sluice_store::NewJob {
            workspace: who.workspace.to_string(),
            kind: sluice_lake::export::KIND.into(),
            payload: sluice_jobs::JobPayload::to_value(&sluice_lake::export::ExportPayload { v: 1, query: name.clone(), scheduled_for: None }),
            max_attempts: 3,
            created_by: Some(who.key_id.clone()),
        })
        .await?;
    st.jobs.wake();
    audit(&st, &who, "query.run", "query", &name, json!({"job": job.id})).await;
    Ok((StatusCode::ACCEPTED, Json(JobView::from(job))))
}

async fn audit(st: &AppState, who: &Principal, action: &str, target_type: &str, target_id: &str, details: Value) {
    let a = who.audit(action, target_type, target_id, details);
    super::record_audit(st, &a).await;
}

/// The lake location in DDL when the request gives none.
pub const LOCATION_PLACEHOLDER: &str = "<lake root>";

/// `GET /v1/lake/ddl` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DdlQuery {
    /// `athena`, `trino`, `duckdb` or `spark`.
    pub engine: String,
    /// Lake location as that engine sees it (default: the placeholder `<lake root>`).
    pub location: Option<String>,
    /// Table name (default `sluice_events`).
    pub table: Option<String>,
}

/// The table definition of the workspace's events for another engine.
#[utoipa::path(get, path = "/v1/lake/ddl", tag = "lake", params(DdlQuery), responses((status = 200, content_type = "text/plain"), (status = 400)), security(("bearer" = [])))]
pub async fn ddl(State(st): State<AppState>, who: Principal, crate::json::Query(q): crate::json::Query<DdlQuery>) -> Result<Response, ApiError> {
    who.require_read()?;
    let lake = lake(&st)?;
    let mut types: Vec<String> = st.store.lake_files(Some(who.workspace.as_str())).await?.into_iter().map(|f| f.content_type).collect();
    types.sort();
    types.dedup();
    // The server's own path is not shown: without `location` the DDL holds
    // a placeholder to replace.
    let location = q.location.unwrap_or_else(|| LOCATION_PLACEHOLDER.to_owned());
    let table = q.table.unwrap_or_else(|| "sluice_events".into());
    if !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ApiError::bad_request("table: only A-Z a-z 0-9 _"));
    }
    let schema = sluice_lake::columns::file_schema(&lake.schemas.columns(who.workspace.as_str()));
    let text = sluice_lake::ddl::ddl(&sluice_lake::ddl::DdlInput {
        engine: &q.engine,
        schema,
        location: &location,
        workspace: who.workspace.as_str(),
        content_types: types,
        table: &table,
    })
    .map_err(|e| ApiError::bad_request(format!("engine: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}
