//! `/events` and `/events/stream`: the tenant's event log, paged and live (SSE).
//!
//! The live stream never loses or repeats an event across the switch from replay to live:
//! it **subscribes first**, then replays from the store after the client's position, then
//! forwards live events, dropping any whose seq it has already sent. The store serves and
//! publishes an event only once it is durable, in seq order, and moves its watermark before
//! publishing, so every event with a higher seq than the last replayed one is either in the
//! subscription queue or still to come. If the subscriber falls behind, the bus drops it; the
//! stream notices, re-subscribes and replays from its last seq — still no gap.
//!
//! Neither route ever shows an event a crash could take back (see `store::durable`).
//! `GET /events` first waits, briefly, for the flush that covers every event appended before
//! the request (a read barrier): an answered command or a connect that happened before the
//! request is in the page, not just in the next one.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{FutureExt as _, stream};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use super::App;
use super::error::ApiError;
use super::http::{Body, json_response, query_params, query_u64};
use crate::auth::Principal;
use crate::events::Event;
use crate::metrics::EventStreamGuard;
use crate::store::{Role, Store, TenantId};

/// Default and largest page of `GET /events`.
pub const DEFAULT_LIMIT: u64 = 100;
pub const MAX_LIMIT: u64 = 1000;
const REPLAY_PAGE: usize = 256;
/// How long `GET /events` waits for its read barrier before serving what is durable already
/// (the flush normally takes milliseconds; a failing or hung disk must not hang readers).
const BARRIER_WAIT: Duration = Duration::from_secs(2);

/// `GET /events?after=SEQ&limit=N` (viewer). Without `after`: the most recent `limit` events.
pub async fn list(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Viewer)?;
    let params = query_params(parts.uri.query());
    let after = query_u64(&params, "after")?;
    let limit = query_u64(&params, "limit")?.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`limit` must be 1..{MAX_LIMIT}"),
        ));
    }
    let limit = limit as usize;
    let barrier = async { Some(app.store.when_all_durable().wait().await) }
        .or(async {
            smol::Timer::after(BARRIER_WAIT).await;
            None
        })
        .await;
    match barrier {
        Some(Ok(())) => {}
        // Serve what is durable; the rest follows in a later page once flushed.
        Some(Err(e)) => tracing::warn!(error = %e, "events read barrier: a flush failed"),
        None => tracing::warn!("events read barrier: no flush within {BARRIER_WAIT:?}"),
    }
    let (store, tenant) = (app.store.clone(), principal.tenant.clone());
    let events = smol::unblock(move || match after {
        Some(after) => store.events(&tenant, after, limit),
        None => store.recent_events(&tenant, limit),
    })
    .await?;
    let last_seq = events.last().map(|e| e.seq).or(after).unwrap_or(0);
    Ok(json_response(
        StatusCode::OK,
        &json!({ "events": events, "last_seq": last_seq }),
    ))
}

/// `GET /events/stream?after=SEQ` (viewer): `text/event-stream`, one SSE message per event
/// (`id: <seq>`, `event: <kind>`, `data: <event JSON>`). Position: `Last-Event-ID` header, else
/// `after`, else "from now".
pub async fn stream(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Viewer)?;
    let params = query_params(parts.uri.query());
    let last_event_id = match parts.headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_last_event_id",
                        "Last-Event-ID must be an event seq (integer)",
                    )
                })?,
        ),
    };
    let store = app.store.clone();
    let after = match last_event_id.or(query_u64(&params, "after")?) {
        Some(after) => after,
        // "From now": read the position before subscribing, so the replay covers the gap.
        None => {
            let store = store.clone();
            smol::unblock(move || store.last_event_seq()).await?
        }
    };
    let tenant = principal.tenant.clone();
    let live = store.subscribe(Some(tenant.clone()));
    let state = SseState {
        store,
        tenant,
        last_sent: after,
        live,
        pending: VecDeque::new(),
        replaying: true,
        started: false,
        keepalive: app.options.sse_keepalive,
        _guard: app.metrics.event_stream_opened(),
    };
    let frames = stream::unfold(state, |mut st| async move {
        let chunk = st.next_chunk().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), st))
    });
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

struct SseState {
    store: Arc<dyn Store>,
    tenant: TenantId,
    last_sent: u64,
    live: async_channel::Receiver<Event>,
    pending: VecDeque<Event>,
    replaying: bool,
    started: bool,
    keepalive: Duration,
    _guard: EventStreamGuard,
}

impl SseState {
    /// The next bytes to send, or `None` to end the stream (the client reconnects and resumes).
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.started {
            self.started = true;
            return Some(Bytes::from_static(b"retry: 2000\n\n"));
        }
        loop {
            while let Some(event) = self.pending.pop_front() {
                if let Some(chunk) = self.emit(&event) {
                    return Some(chunk);
                }
            }
            if self.replaying {
                let (store, tenant, after) =
                    (self.store.clone(), self.tenant.clone(), self.last_sent);
                match smol::unblock(move || store.events(&tenant, after, REPLAY_PAGE)).await {
                    Ok(page) if page.is_empty() => self.replaying = false,
                    Ok(page) => self.pending.extend(page),
                    Err(e) => {
                        tracing::warn!(error = %e, "event replay failed; ending the stream");
                        return None;
                    }
                }
                continue;
            }
            let keepalive = self.keepalive;
            let next = async { Some(self.live.recv().await) }
                .or(async {
                    smol::Timer::after(keepalive).await;
                    None
                })
                .await;
            match next {
                Some(Ok(event)) => {
                    if let Some(chunk) = self.emit(&event) {
                        return Some(chunk);
                    }
                }
                Some(Err(_)) => {
                    // Dropped for falling behind: re-subscribe, then catch up from the store.
                    self.live = self.store.subscribe(Some(self.tenant.clone()));
                    self.replaying = true;
                }
                None => return Some(Bytes::from_static(b": keepalive\n\n")),
            }
        }
    }

    /// Formats `event` unless it was already sent.
    fn emit(&mut self, event: &Event) -> Option<Bytes> {
        if event.seq <= self.last_sent {
            return None;
        }
        self.last_sent = event.seq;
        Some(Bytes::from(sse_message(event)))
    }
}

/// One SSE message. The JSON is compact (no newlines), so one `data:` line suffices; the kind
/// is sanitised in case a future kind contains a newline.
pub fn sse_message(event: &Event) -> String {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    let kind: String = event.kind.chars().filter(|c| !c.is_control()).collect();
    format!("id: {}\nevent: {kind}\ndata: {data}\n\n", event.seq)
}

/// The JSON of one event, as served by both routes.
pub fn view(event: &Event) -> Value {
    serde_json::to_value(event).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventDraft;
    use crate::metrics::Metrics;
    use crate::store::sled::SledStore;

    fn draft(tenant: &TenantId, n: u64) -> EventDraft {
        EventDraft::new(tenant, n, "system", "test", json!({ "n": n }))
    }

    fn seq_of(chunk: &Bytes) -> Option<u64> {
        let text = std::str::from_utf8(chunk).ok()?;
        text.strip_prefix("id: ")?.lines().next()?.parse().ok()
    }

    /// A subscriber whose queue overflows is dropped by the bus; the stream must notice,
    /// re-subscribe and catch up from the store without a gap or a duplicate.
    #[test]
    fn a_lagging_stream_catches_up_without_gaps_or_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(
            SledStore::open(dir.path())
                .expect("open")
                .with_subscriber_queue(2),
        );
        let tenant = TenantId::parse("t").expect("valid");
        let other = TenantId::parse("other").expect("valid");
        for n in 0..3 {
            store.append_event(draft(&tenant, n)).expect("append");
        }
        store.flush().expect("flush");
        let metrics = Arc::new(Metrics::new());
        let mut state = SseState {
            store: store.clone(),
            tenant: tenant.clone(),
            last_sent: 1,
            live: store.subscribe(Some(tenant.clone())),
            pending: VecDeque::new(),
            replaying: true,
            started: false,
            keepalive: Duration::from_secs(60),
            _guard: metrics.event_stream_opened(),
        };
        smol::block_on(async {
            assert_eq!(
                state.next_chunk().await.as_deref(),
                Some(&b"retry: 2000\n\n"[..])
            );
            // Replay: seq 2 and 3 (after 1).
            let mut seen = Vec::new();
            for _ in 0..2 {
                seen.push(
                    state
                        .next_chunk()
                        .await
                        .as_ref()
                        .and_then(seq_of)
                        .expect("event"),
                );
            }
            // Now overflow the queue of 2 while the stream is not reading, interleaving
            // another tenant's events.
            for n in 0..10 {
                store.append_event(draft(&tenant, n)).expect("append");
                store.append_event(draft(&other, n)).expect("append");
            }
            store.flush().expect("flush");
            for _ in 0..10 {
                seen.push(
                    state
                        .next_chunk()
                        .await
                        .as_ref()
                        .and_then(seq_of)
                        .expect("event"),
                );
            }
            let expected: Vec<u64> = [2, 3]
                .into_iter()
                .chain((0..10).map(|i| 4 + 2 * i))
                .collect();
            assert_eq!(seen, expected);
            // Live again after the catch-up.
            let ev = store.append_event(draft(&tenant, 99)).expect("append");
            assert_eq!(
                state.next_chunk().await.as_ref().and_then(seq_of),
                Some(ev.seq)
            );
        });
    }
}
