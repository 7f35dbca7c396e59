//! `GET /v1/live`: Server-Sent Events that tell a dashboard which of its
//! lists changed, so that it reads a list again only when there is
//! something new instead of every list every few seconds.
//!
//! The server looks once a second (one indexed `MAX(updated_at)` per
//! topic, [`sluice_store::Store::change_marks`]) and sends
//! `event: changed` with `{"topics": ["jobs", …]}` when a mark moved:
//! `jobs` (any job of the workspace, so imports and billing runs too) and
//! `dead_letters`. The first event, `ready`, says the stream is live. A
//! comment every 15 s keeps proxies from closing an idle stream. The stream
//! ends when the server starts draining (shutdown), within a second.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde_json::json;
use sluice_store::ChangeMarks;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;

/// How often the server looks for changes.
const EVERY: Duration = Duration::from_secs(1);

/// Which topics differ between two marks.
fn changed(before: &ChangeMarks, now: &ChangeMarks) -> Vec<&'static str> {
    let mut out = Vec::new();
    if before.jobs != now.jobs {
        out.push("jobs");
    }
    if before.dead_letters != now.dead_letters {
        out.push("dead_letters");
    }
    out
}

/// Change notifications for the key's workspace.
#[utoipa::path(get, path = "/v1/live", tag = "operations",
    responses((status = 200, content_type = "text/event-stream", description = "`event: ready`, then `event: changed` with `{\"topics\": [\"jobs\" | \"dead_letters\", …]}`"),
        (status = 401), (status = 403)),
    security(("bearer" = []), ("session" = [])))]
pub async fn live(State(st): State<AppState>, who: Principal) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    who.require_read()?;
    let ws = who.workspace.to_string();
    let (store, ready) = (st.store.clone(), st.ready.clone());
    let first = store.change_marks(&ws).await?;
    let stream = futures::stream::unfold((first, true), move |(last, starting)| {
        let (store, ws, ready) = (store.clone(), ws.clone(), ready.clone());
        async move {
            if starting {
                return Some((Ok(Event::default().event("ready").data("{}")), (last, false)));
            }
            loop {
                tokio::time::sleep(EVERY).await;
                // The stream never ends by itself: it ends when the server
                // drains for a shutdown, which would otherwise wait for
                // every open dashboard until its timeout.
                if !ready.load(std::sync::atomic::Ordering::Acquire) {
                    return None;
                }
                // A failing read is tried again at the next second; the
                // dashboard's slow refresh covers the gap.
                let Ok(now) = store.change_marks(&ws).await else { continue };
                let topics = changed(&last, &now);
                if !topics.is_empty() {
                    let data = json!({"topics": topics}).to_string();
                    return Some((Ok(Event::default().event("changed").data(data)), (now, false)));
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_changes_when_its_mark_moves() {
        let a = ChangeMarks { jobs: Some(1), dead_letters: None };
        assert!(changed(&a, &a).is_empty());
        assert_eq!(changed(&a, &ChangeMarks { jobs: Some(2), ..a }), vec!["jobs"]);
        assert_eq!(changed(&a, &ChangeMarks { dead_letters: Some(5), ..a }), vec!["dead_letters"]);
        assert_eq!(changed(&ChangeMarks::default(), &ChangeMarks { jobs: Some(1), dead_letters: Some(1) }), vec!["jobs", "dead_letters"]);
    }
}
