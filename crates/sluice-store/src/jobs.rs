//! Durable jobs. Claiming is `UPDATE … WHERE id IN (SELECT … FOR UPDATE
//! SKIP LOCKED) RETURNING` on PostgreSQL (many workers, no double claims)
//! and the same `UPDATE … RETURNING` without row locks on SQLite, whose
//! single writer serialises claims anyway.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::audit::NewAudit;

use crate::BeginWrite as _;
use crate::{clamp_limit, from_micros, on_pool, to_micros, write_stmt, write_tx, Page, Result, Store, StoreError};

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Workspace the job belongs to.
    pub workspace: String,
    /// Kind, e.g. `import.usage`; decides the handler.
    pub kind: String,
    /// Handler input.
    pub payload: Value,
    /// Attempts before the job fails for good (≥ 1).
    pub max_attempts: u32,
    /// Key that created it.
    pub created_by: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// `job_…`, time-ordered.
    pub id: String,
    /// Workspace.
    pub workspace: String,
    /// Kind.
    pub kind: String,
    /// Where the job is in its life.
    pub state: sluice_core::JobState,
    /// Input.
    pub payload: Value,
    /// Output of a succeeded job.
    pub result: Option<Value>,
    /// Last error.
    pub error: Option<String>,
    /// Every error of every attempt, oldest first (at most 100 kept).
    pub errors: Vec<String>,
    /// Units of work done.
    pub progress_done: i64,
    /// Units of work in all, when known.
    pub progress_total: Option<i64>,
    /// Attempts started.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Not claimed before this time (backoff).
    pub run_after: DateTime<Utc>,
    /// A cancellation was asked for while running.
    pub cancel_requested: bool,
    /// Key that created it.
    pub created_by: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// First started.
    pub started_at: Option<DateTime<Utc>>,
    /// Ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl Job {
    /// True once the job will not change any more.
    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }
}

const COLUMNS: &str = "id, workspace, kind, state, payload, result, error, errors, progress_done, progress_total, \
    attempts, max_attempts, run_after, cancel_requested, created_by, created_at, started_at, finished_at, updated_at";

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    workspace: String,
    kind: String,
    state: String,
    payload: String,
    result: Option<String>,
    error: Option<String>,
    errors: String,
    progress_done: i64,
    progress_total: Option<i64>,
    attempts: i32,
    max_attempts: i32,
    run_after: i64,
    cancel_requested: bool,
    created_by: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    updated_at: i64,
}

impl TryFrom<Row> for Job {
    type Error = StoreError;

    /// An unknown state (written by a newer binary, or by hand) is an error,
    /// never read as another state.
    fn try_from(r: Row) -> Result<Job> {
        let state = r.state.parse().map_err(|e: sluice_core::UnknownJobState| StoreError::Corrupt(format!("job {}: {e}", r.id)))?;
        Ok(Job {
            id: r.id,
            workspace: r.workspace,
            kind: r.kind,
            state,
            payload: serde_json::from_str(&r.payload).unwrap_or(Value::Null),
            result: r.result.and_then(|t| serde_json::from_str(&t).ok()),
            error: r.error,
            errors: serde_json::from_str(&r.errors).unwrap_or_default(),
            progress_done: r.progress_done,
            progress_total: r.progress_total,
            attempts: r.attempts as u32,
            max_attempts: r.max_attempts as u32,
            run_after: from_micros(r.run_after),
            cancel_requested: r.cancel_requested,
            created_by: r.created_by,
            created_at: from_micros(r.created_at),
            started_at: r.started_at.map(from_micros),
            finished_at: r.finished_at.map(from_micros),
            updated_at: from_micros(r.updated_at),
        })
    }
}

/// Which jobs of a workspace a bulk cancel or retry concerns.
#[derive(Debug, Clone, PartialEq)]
pub enum JobSelection {
    /// These jobs; ids of other workspaces are treated as unknown.
    Ids(Vec<String>),
    /// Every job of this kind and in this state (each optional).
    Filter {
        /// Only this kind.
        kind: Option<String>,
        /// Only this state.
        state: Option<sluice_core::JobState>,
    },
}

impl JobSelection {
    /// The parameters `$2` (ids as a JSON array), `$3` (kind) and `$4`
    /// (state) of [`JobSelection::sql`].
    fn params(&self) -> (Option<String>, Option<&str>, Option<&'static str>) {
        match self {
            JobSelection::Ids(ids) => (Some(serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())), None, None),
            JobSelection::Filter { kind, state } => (None, kind.as_deref(), state.map(sluice_core::JobState::as_str)),
        }
    }

    /// The condition of a selection, over `$2`–`$4` of [`JobSelection::params`].
    fn sql(store: &Store) -> String {
        format!("($2 IS NULL OR id {}) AND ($3 IS NULL OR kind = $3) AND ($4 IS NULL OR state = $4)", store.in_json_array(2))
    }
}

/// What a bulk cancel or retry did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BulkJobs {
    /// Jobs cancelled (or asked to stop) or queued again.
    pub changed: Vec<String>,
    /// Ids given that were left alone, with why (always empty for a filter:
    /// a filter only matches jobs it can change).
    pub skipped: Vec<(String, String)>,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub enum JobEnd {
    /// Done, with a result.
    Succeeded(Value),
    /// Failed; queued again after `retry_in` unless attempts are used up.
    Failed {
        /// Why.
        error: String,
        /// Backoff before the next attempt.
        retry_in: std::time::Duration,
    },
    /// Stopped because a cancellation was asked for.
    Cancelled,
    /// Failed for good (retrying cannot help), keeping a result.
    Fatal {
        /// Why.
        error: String,
        /// Result to keep (e.g. the errors of an import).
        result: Value,
    },
}

impl Store {
    /// Enqueues a job.
    pub async fn enqueue_job(&self, j: &NewJob) -> Result<Job> {
        let now = to_micros(Utc::now());
        let id = format!("job_{}", uuid::Uuid::now_v7().simple());
        on_pool!(self, pool => sqlx::query(
            "INSERT INTO jobs (id, workspace, kind, state, payload, errors, progress_done, attempts, max_attempts, run_after, \
             cancel_requested, created_by, created_at, updated_at) VALUES ($1, $2, $3, 'queued', $4, '[]', 0, 0, $5, $6, $7, $8, $6, $6)")
            .bind(&id).bind(&j.workspace).bind(&j.kind).bind(j.payload.to_string()).bind(j.max_attempts.max(1) as i32)
            .bind(now).bind(false).bind(&j.created_by)
            .execute(pool).await.map(|_| ()))?;
        self.get_job(None, &id).await
    }

    /// One job (of `workspace`, when given).
    pub async fn get_job(&self, workspace: Option<&str>, id: &str) -> Result<Job> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1 AND ($2 IS NULL OR workspace = $2)");
        let row: Option<Row> = on_pool!(self, pool => sqlx::query_as(&sql).bind(id).bind(workspace).fetch_optional(pool).await)?;
        row.map(Job::try_from).ok_or(StoreError::NotFound)?
    }

    /// Jobs of a workspace, oldest first.
    pub async fn list_jobs(
        &self,
        workspace: &str,
        kind: Option<&str>,
        state: Option<sluice_core::JobState>,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Job>> {
        self.list_jobs_in(workspace, kind, state, sluice_core::SortOrder::Asc, cursor, limit).await
    }

    /// Jobs of a workspace in `order` (ids grow with creation time), with
    /// the same filters as [`Store::list_jobs`].
    pub async fn list_jobs_in(
        &self,
        workspace: &str,
        kind: Option<&str>,
        state: Option<sluice_core::JobState>,
        order: sluice_core::SortOrder,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Job>> {
        let state = state.map(sluice_core::JobState::as_str);
        let limit = clamp_limit(limit);
        let page = match order {
            sluice_core::SortOrder::Asc => "AND id > $4 ORDER BY id",
            sluice_core::SortOrder::Desc => "AND ($4 = '' OR id < $4) ORDER BY id DESC",
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs WHERE workspace = $1 AND ($2 IS NULL OR kind = $2) AND ($3 IS NULL OR state = $3) \
             {page} LIMIT $5"
        );
        let rows: Vec<Row> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(workspace).bind(kind).bind(state).bind(cursor.unwrap_or("")).bind(limit as i64 + 1).fetch_all(pool).await)?;
        Ok(Page::from_overfetch(rows.into_iter().map(Job::try_from).collect::<Result<Vec<_>>>()?, limit, |j: &Job| j.id.clone()))
    }

    /// Claims up to `n` queued jobs of `kind` that are due, oldest first,
    /// marking them running with a lease of `lease`.
    pub async fn claim_jobs(&self, kind: &str, n: usize, lease: std::time::Duration) -> Result<Vec<Job>> {
        self.claim(kind, n, lease, false).await
    }

    /// [`Store::claim_jobs`] for a kind whose jobs run one at a time and in
    /// order within a workspace, while jobs of other workspaces run beside
    /// them: a job is claimed only when no job of its kind and workspace is
    /// running and none queued before it waits (a billing run of one tenant
    /// does not hold up another tenant's, and one tenant's runs keep their
    /// order).
    pub async fn claim_jobs_one_per_workspace(&self, kind: &str, n: usize, lease: std::time::Duration) -> Result<Vec<Job>> {
        self.claim(kind, n, lease, true).await
    }

    async fn claim(&self, kind: &str, n: usize, lease: std::time::Duration, one_per_workspace: bool) -> Result<Vec<Job>> {
        if n == 0 {
            return Ok(vec![]);
        }
        let now = Utc::now();
        let until = to_micros(now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30)));
        let now = to_micros(now);
        let lock = match self {
            Store::Sqlite(_) => "",
            Store::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        };
        let serial = if one_per_workspace {
            " AND NOT EXISTS (SELECT 1 FROM jobs o WHERE o.kind = j.kind AND o.workspace = j.workspace \
              AND (o.state = 'running' OR (o.state = 'queued' AND o.id < j.id)))"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_until = $1, \
             started_at = COALESCE(started_at, $2), updated_at = $2 \
             WHERE id IN (SELECT id FROM jobs j WHERE state = 'queued' AND kind = $3 AND run_after <= $2{serial} ORDER BY id LIMIT $4{lock}) \
             RETURNING {COLUMNS}"
        );
        // Most polls find nothing due: look with a read first, which waits
        // for no writer (SQLite's WAL), instead of taking the write lock
        // every poll of every kind.
        let look = format!("SELECT EXISTS (SELECT 1 FROM jobs j WHERE state = 'queued' AND kind = $1 AND run_after <= $2{serial})");
        let due: bool = on_pool!(self, pool => sqlx::query_scalar(&look).bind(kind).bind(now).fetch_one(pool).await)?;
        if !due {
            return Ok(vec![]);
        }
        let mut rows: Vec<Row> =
            write_tx!(self, tx => sqlx::query_as(&sql).bind(until).bind(now).bind(kind).bind(n as i64).fetch_all(&mut *tx).await?)?;
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        rows.into_iter().map(Job::try_from).collect()
    }

    /// Extends the lease of attempt `attempt` of a running job. Returns
    /// `Some(cancel_requested)` while that attempt still holds the job, and
    /// `None` once it lost it (the lease expired and the job was reclaimed
    /// for another attempt, or the job ended): that attempt must stop, and
    /// nothing it reports afterwards is recorded.
    pub async fn heartbeat_job(&self, id: &str, attempt: u32, lease: std::time::Duration) -> Result<Option<bool>> {
        let until = to_micros(Utc::now() + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30)));
        let row: Option<(bool,)> = on_pool!(self, pool => sqlx::query_as(
            "UPDATE jobs SET lease_until = $1 WHERE id = $2 AND state = 'running' AND attempts = $3 RETURNING cancel_requested")
            .bind(until).bind(id).bind(attempt as i32).fetch_optional(pool).await)?;
        Ok(row.map(|(c,)| c))
    }

    /// Records progress of a running job.
    pub async fn job_progress(&self, id: &str, attempt: u32, done: i64, total: Option<i64>) -> Result<()> {
        let now = to_micros(Utc::now());
        write_tx!(self, tx => sqlx::query(
            "UPDATE jobs SET progress_done = $1, progress_total = COALESCE($2, progress_total), updated_at = $3 \
             WHERE id = $4 AND state = 'running' AND attempts = $5")
            .bind(done).bind(total).bind(now).bind(id).bind(attempt as i32).execute(&mut *tx).await?.rows_affected())?;
        Ok(())
    }

    /// Ends attempt `attempt` of a running job. Fails with
    /// [`StoreError::Conflict`] when that attempt no longer holds the job
    /// (its lease expired and another attempt took over): a stale attempt
    /// never overwrites what a later one records.
    pub async fn finish_job(&self, id: &str, attempt: u32, end: &JobEnd) -> Result<Job> {
        let lost = || StoreError::Conflict(format!("attempt {attempt} of job {id} no longer holds it (lease lost)"));
        let now = Utc::now();
        // Success and cancellation keep everything earlier attempts recorded:
        // one statement. A failure appends to the job's errors and decides on
        // a retry from its attempts: read the job first.
        let (error, retry_in, fatal_result) = match end {
            JobEnd::Succeeded(v) => return self.end_job(id, attempt, "succeeded", Some(v.to_string())).await?.ok_or_else(lost),
            JobEnd::Cancelled => return self.end_job(id, attempt, "cancelled", None).await?.ok_or_else(lost),
            JobEnd::Fatal { error, result } => (error, std::time::Duration::ZERO, Some(result)),
            JobEnd::Failed { error, retry_in } => (error, *retry_in, None),
        };
        let job = self.get_job(None, id).await?;
        if job.state != sluice_core::JobState::Running || job.attempts != attempt {
            return Err(lost());
        }
        let mut errors = job.errors.clone();
        errors.push(format!("attempt {}: {error}", job.attempts));
        let (state, result, run_after, finished) = match fatal_result {
            Some(result) => ("failed", Some(result.to_string()), job.run_after, Some(now)),
            None => {
                if errors.len() > 100 {
                    errors.drain(..errors.len() - 100);
                }
                if job.cancel_requested {
                    // The handler failed after a cancellation was asked for:
                    // honour the cancellation rather than retrying.
                    ("cancelled", None, job.run_after, Some(now))
                } else if job.attempts < job.max_attempts {
                    ("queued", None, now + chrono::Duration::from_std(retry_in).unwrap_or_default(), None)
                } else {
                    ("failed", None, job.run_after, Some(now))
                }
            }
        };
        let sql = format!(
            "UPDATE jobs SET state = $1, result = $2, error = $3, errors = $4, run_after = $5, finished_at = $6, \
             lease_until = NULL, updated_at = $7 WHERE id = $8 AND state = 'running' AND attempts = $9 RETURNING {COLUMNS}"
        );
        let row: Option<Row> = write_stmt!(self, pool => sqlx::query_as(&sql)
            .bind(state).bind(result).bind(error).bind(serde_json::to_string(&errors).unwrap_or_else(|_| "[]".into()))
            .bind(to_micros(run_after)).bind(finished.map(to_micros)).bind(to_micros(now)).bind(id).bind(attempt as i32)
            .fetch_optional(pool).await)?;
        row.map(Job::try_from).ok_or_else(lost)?
    }

    /// Ends a running attempt as `state` with `result`, leaving its error
    /// history as it is; `None` when the attempt no longer holds the job.
    async fn end_job(&self, id: &str, attempt: u32, state: &str, result: Option<String>) -> Result<Option<Job>> {
        let now = to_micros(Utc::now());
        let sql = format!(
            "UPDATE jobs SET state = $1, result = $2, finished_at = $3, lease_until = NULL, updated_at = $3 \
             WHERE id = $4 AND state = 'running' AND attempts = $5 RETURNING {COLUMNS}"
        );
        let row: Option<Row> = write_stmt!(self, pool => sqlx::query_as(&sql)
            .bind(state).bind(result).bind(now).bind(id).bind(attempt as i32).fetch_optional(pool).await)?;
        row.map(Job::try_from).transpose()
    }

    /// Cancels a job: a queued one at once, a running one by asking its
    /// handler to stop (it ends `cancelled` at its next check).
    pub async fn cancel_job(&self, workspace: &str, id: &str) -> Result<Job> {
        let now = to_micros(Utc::now());
        let job = self.get_job(Some(workspace), id).await?;
        match job.state {
            sluice_core::JobState::Queued => {
                on_pool!(self, pool => sqlx::query(
                    "UPDATE jobs SET state = 'cancelled', finished_at = $1, updated_at = $1 WHERE id = $2 AND state = 'queued'")
                    .bind(now).bind(id).execute(pool).await.map(|_| ()))?;
            }
            sluice_core::JobState::Running => {
                on_pool!(self, pool => sqlx::query(
                    "UPDATE jobs SET cancel_requested = $1, updated_at = $2 WHERE id = $3 AND state = 'running'")
                    .bind(true).bind(now).bind(id).execute(pool).await.map(|_| ()))?;
            }
            other => return Err(StoreError::Conflict(format!("job is {other}; only queued or running jobs can be cancelled"))),
        }
        self.get_job(Some(workspace), id).await
    }

    /// Queues a failed or cancelled job again, with fresh attempts.
    pub async fn retry_job(&self, workspace: &str, id: &str) -> Result<Job> {
        let now = to_micros(Utc::now());
        let n = on_pool!(self, pool => sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = 0, run_after = $1, finished_at = NULL, cancel_requested = $2, \
             updated_at = $1 WHERE id = $3 AND workspace = $4 AND state IN ('failed', 'cancelled')")
            .bind(now).bind(false).bind(id).bind(workspace).execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 0 {
            let job = self.get_job(Some(workspace), id).await?;
            return Err(StoreError::Conflict(format!("job is {}; only failed or cancelled jobs can be retried", job.state)));
        }
        self.get_job(Some(workspace), id).await
    }

    /// How many jobs of `workspace` in `sel` a bulk cancel (`cancel`) or
    /// retry would change: queued or running jobs, or failed or cancelled
    /// ones (the dry run of [`Store::cancel_jobs`] and [`Store::retry_jobs`]).
    pub async fn count_bulk_jobs(&self, workspace: &str, sel: &JobSelection, cancel: bool) -> Result<u64> {
        let states = if cancel { "('queued', 'running')" } else { "('failed', 'cancelled')" };
        let sql = format!("SELECT COUNT(*) FROM jobs WHERE workspace = $1 AND state IN {states} AND {}", JobSelection::sql(self));
        let (ids, kind, state) = sel.params();
        let n: i64 = on_pool!(self, pool => sqlx::query_scalar(&sql).bind(workspace).bind(ids).bind(kind).bind(state).fetch_one(pool).await)?;
        Ok(n.max(0) as u64)
    }

    /// Cancels the jobs of `workspace` in `sel` as [`Store::cancel_job`]
    /// does each (queued ones at once, running ones by asking them to
    /// stop), in one transaction with `audit` (its details get the
    /// `count`) when any changed: two statements, whatever the number of
    /// jobs. Ids given that are not queued or running are skipped with why.
    pub async fn cancel_jobs(&self, workspace: &str, sel: &JobSelection, audit: &NewAudit) -> Result<BulkJobs> {
        let now = to_micros(Utc::now());
        let cond = JobSelection::sql(self);
        let queued = format!(
            "UPDATE jobs SET state = 'cancelled', finished_at = $5, updated_at = $5 WHERE workspace = $1 AND state = 'queued' AND {cond} RETURNING id"
        );
        let running =
            format!("UPDATE jobs SET cancel_requested = $6, updated_at = $5 WHERE workspace = $1 AND state = 'running' AND {cond} RETURNING id");
        let (ids, kind, state) = sel.params();
        let changed: Vec<String> = write_tx!(self, tx => {
            // Queued first: a job claimed in between is then caught as running.
            let mut changed: Vec<String> = sqlx::query_scalar(&queued)
                .bind(workspace).bind(&ids).bind(kind).bind(state).bind(now).fetch_all(&mut *tx).await?;
            changed.extend(sqlx::query_scalar::<_, String>(&running)
                .bind(workspace).bind(&ids).bind(kind).bind(state).bind(now).bind(true).fetch_all(&mut *tx).await?);
            if !changed.is_empty() {
                let a = audit.with_count(changed.len() as u64);
                crate::audit::insert_audit!(tx, &a);
            }
            changed
        })?;
        let skipped = self.skipped_jobs(workspace, sel, &changed, "only queued or running jobs can be cancelled").await?;
        Ok(BulkJobs { changed, skipped })
    }

    /// Queues the failed or cancelled jobs of `workspace` in `sel` again,
    /// as [`Store::retry_job`] does each: one statement, in one transaction
    /// with `audit` (its details get the `count`) when any changed. Ids
    /// given that are not failed or cancelled are skipped with why.
    pub async fn retry_jobs(&self, workspace: &str, sel: &JobSelection, audit: &NewAudit) -> Result<BulkJobs> {
        let now = to_micros(Utc::now());
        let sql = format!(
            "UPDATE jobs SET state = 'queued', attempts = 0, run_after = $5, finished_at = NULL, cancel_requested = $6, updated_at = $5 \
             WHERE workspace = $1 AND state IN ('failed', 'cancelled') AND {} RETURNING id",
            JobSelection::sql(self)
        );
        let (ids, kind, state) = sel.params();
        let changed: Vec<String> = write_tx!(self, tx => {
            let changed: Vec<String> = sqlx::query_scalar(&sql)
                .bind(workspace).bind(&ids).bind(kind).bind(state).bind(now).bind(false).fetch_all(&mut *tx).await?;
            if !changed.is_empty() {
                let a = audit.with_count(changed.len() as u64);
                crate::audit::insert_audit!(tx, &a);
            }
            changed
        })?;
        let skipped = self.skipped_jobs(workspace, sel, &changed, "only failed or cancelled jobs can be retried").await?;
        Ok(BulkJobs { changed, skipped })
    }

    /// The ids of `sel` (when it is a list) that are not in `changed`, with
    /// why: unknown in the workspace, or in a state the operation skips.
    async fn skipped_jobs(&self, workspace: &str, sel: &JobSelection, changed: &[String], rule: &str) -> Result<Vec<(String, String)>> {
        let JobSelection::Ids(ids) = sel else { return Ok(vec![]) };
        let changed: std::collections::HashSet<&str> = changed.iter().map(String::as_str).collect();
        let left: Vec<&str> = ids.iter().map(String::as_str).filter(|id| !changed.contains(id)).collect();
        if left.is_empty() {
            return Ok(vec![]);
        }
        let sql = format!("SELECT id, state FROM jobs WHERE workspace = $1 AND id {}", self.in_json_array(2));
        let rows: Vec<(String, String)> = on_pool!(self, pool => sqlx::query_as(&sql)
            .bind(workspace).bind(serde_json::to_string(&left).unwrap_or_else(|_| "[]".into())).fetch_all(pool).await)?;
        let states: HashMap<String, String> = rows.into_iter().collect();
        Ok(left
            .into_iter()
            .map(|id| {
                let why = match states.get(id) {
                    Some(state) => format!("job is {state}; {rule}"),
                    None => "not found".to_owned(),
                };
                (id.to_owned(), why)
            })
            .collect())
    }

    /// Puts running jobs whose lease expired (their process died) back in
    /// the queue, or fails them when their attempts are used up. Returns how
    /// many were reclaimed.
    pub async fn reclaim_expired_jobs(&self) -> Result<u64> {
        let now = to_micros(Utc::now());
        let n = write_tx!(self, tx => {
            let failed = sqlx::query(
                "UPDATE jobs SET state = 'failed', error = 'the process running it stopped (lease expired) and no attempts are left', \
                 finished_at = $1, lease_until = NULL, updated_at = $1 WHERE state = 'running' AND lease_until < $1 AND attempts >= max_attempts")
                .bind(now).execute(&mut *tx).await?.rows_affected();
            let queued = sqlx::query(
                "UPDATE jobs SET state = 'queued', lease_until = NULL, updated_at = $1 WHERE state = 'running' AND lease_until < $1")
                .bind(now).execute(&mut *tx).await?.rows_affected();
            failed + queued
        })?;
        Ok(n)
    }
}
