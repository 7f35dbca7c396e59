//! API keys. Only a SHA-256 digest of each secret is stored.

use chrono::{DateTime, Utc};
use sluice_core::Scope;

use crate::BeginWrite as _;
use crate::{clamp_limit, from_micros, on_pool, parse_scope, to_micros, NewAudit, Page, Result, Store, StoreError};

/// A key as listed (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Public id, e.g. `key_01J…`.
    pub id: String,
    /// Workspace the key belongs to.
    pub workspace: String,
    /// Human name.
    pub name: String,
    /// What the key may do.
    pub scope: Scope,
    /// First characters of the secret, to recognise it in a list.
    pub prefix: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Id of the key that created this one (None for the bootstrap key).
    pub created_by: Option<String>,
}

/// A key to insert.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// Public id.
    pub id: String,
    /// Workspace the key belongs to.
    pub workspace: String,
    /// Human name.
    pub name: String,
    /// What the key may do.
    pub scope: Scope,
    /// SHA-256 of the secret.
    pub key_hash: Vec<u8>,
    /// First characters of the secret.
    pub prefix: String,
    /// Id of the creating key.
    pub created_by: Option<String>,
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    workspace: String,
    name: String,
    scope: String,
    prefix: String,
    created_at: i64,
    created_by: Option<String>,
}

impl From<KeyRow> for ApiKey {
    fn from(r: KeyRow) -> Self {
        ApiKey {
            id: r.id,
            workspace: r.workspace,
            name: r.name,
            scope: parse_scope(&r.scope),
            prefix: r.prefix,
            created_at: from_micros(r.created_at),
            created_by: r.created_by,
        }
    }
}

const KEY_COLUMNS: &str = "id, workspace, name, scope, prefix, created_at, created_by";

/// The insert statement of a key, bindable on either backend.
pub(crate) fn insert_key_query<DB: sqlx::Database>(key: &NewApiKey, now: i64) -> sqlx::query::Query<'_, DB, <DB as sqlx::Database>::Arguments<'_>>
where
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Vec<u8>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(
        "INSERT INTO api_keys (id, workspace, name, scope, key_hash, prefix, created_at, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(key.id.clone())
    .bind(key.workspace.clone())
    .bind(key.name.clone())
    .bind(key.scope.as_str())
    .bind(key.key_hash.clone())
    .bind(key.prefix.clone())
    .bind(now)
    .bind(key.created_by.clone())
}

impl Store {
    /// Stores a new key. The workspace must exist ([`StoreError::NotFound`] otherwise).
    pub async fn create_key(&self, key: &NewApiKey, audit: &NewAudit) -> Result<ApiKey> {
        let now = to_micros(Utc::now());
        self.get_workspace(&key.workspace).await?;
        let conflict = |e| StoreError::conflict_on_unique(e, "a key with this secret already exists");
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            insert_key_query(key, now).execute(&mut *tx).await.map_err(conflict)?;
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
        });
        Ok(ApiKey {
            id: key.id.clone(),
            workspace: key.workspace.clone(),
            name: key.name.clone(),
            scope: key.scope,
            prefix: key.prefix.clone(),
            created_at: from_micros(now),
            created_by: key.created_by.clone(),
        })
    }

    /// The live (not revoked) key whose secret hashes to `hash`.
    pub async fn find_key_by_hash(&self, hash: &[u8]) -> Result<Option<(ApiKey, Vec<u8>)>> {
        #[derive(sqlx::FromRow)]
        struct Row {
            #[sqlx(flatten)]
            key: KeyRow,
            key_hash: Vec<u8>,
        }
        let sql = format!("SELECT {KEY_COLUMNS}, key_hash FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL");
        let row: Option<Row> = on_pool!(self, pool => sqlx::query_as(&sql).bind(hash).fetch_optional(pool).await)?;
        Ok(row.map(|r| (r.key.into(), r.key_hash)))
    }

    /// One live key by id.
    pub async fn get_key(&self, id: &str) -> Result<ApiKey> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 AND revoked_at IS NULL");
        let row: Option<KeyRow> = on_pool!(self, pool => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await)?;
        row.map(Into::into).ok_or(StoreError::NotFound)
    }

    /// Live keys, optionally of one workspace, ordered by id (creation order).
    pub async fn list_keys(&self, workspace: Option<&str>, cursor: Option<&str>, limit: usize) -> Result<Page<ApiKey>> {
        let limit = clamp_limit(limit);
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND ($1 IS NULL OR workspace = $1) \
             AND id > $2 ORDER BY id LIMIT $3"
        );
        let rows: Vec<KeyRow> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(workspace).bind(cursor.unwrap_or("")).bind(limit as i64 + 1).fetch_all(pool).await)?;
        let rows = rows.into_iter().map(ApiKey::from).collect();
        Ok(Page::from_overfetch(rows, limit, |k: &ApiKey| k.id.clone()))
    }

    /// Revokes a key. Revoked keys stay in the table (for the audit trail) but
    /// never authenticate again.
    pub async fn revoke_key(&self, id: &str, audit: &NewAudit) -> Result<()> {
        let now = to_micros(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let n = sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now).bind(id).execute(&mut *tx).await?.rows_affected();
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            crate::audit::insert_audit!(tx, audit);
            tx.commit().await?;
            Ok(())
        })
    }

    /// Number of live root keys (the last one may not be revoked).
    pub async fn count_root_keys(&self) -> Result<i64> {
        let (n,): (i64,) = on_pool!(self, pool => sqlx::query_as(
            "SELECT COUNT(*) FROM api_keys WHERE scope = 'root' AND revoked_at IS NULL").fetch_one(pool).await)?;
        Ok(n)
    }
}
