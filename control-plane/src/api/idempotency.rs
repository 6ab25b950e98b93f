//! `Idempotency-Key` for mutating routes: a retry with the same key (in the same tenant)
//! returns the first response and runs nothing.
//!
//! Protocol:
//! 1. No header → the handler just runs.
//! 2. The key is claimed atomically in the store together with a fingerprint of the request
//!    (method, path, body). A claim is a short lease, so a crash mid-request frees the key.
//! 3. The handler's `Ok` reply (whatever its status) is stored and replayed for
//!    [`RETENTION_MS`]; replays carry `idempotent-replayed: true`.
//! 4. An `Err` releases the key: our errors mean nothing was changed, so a retry may run.
//!    (Device routes whose outcome is ambiguous after dispatch — a timeout — should derive the
//!    daemon request id from the key, see [`IdempotencyKey::derived_request_id`], so that the
//!    daemon's own journal de-duplicates a re-dispatch.)
//! 5. Same key, different request → 422 `idempotency_key_reused`; same key while the first is
//!    still running → 409 `idempotency_key_in_progress`.
//! 6. "Still running" means running in this process ([`InFlight`]). The store has one owner
//!    process (sled locks its directory), so a claim without a response that this process is
//!    not working on was left behind — by a control plane killed mid-request, or by a request
//!    whose response could not be stored (full disk) — and is taken over at once: the retry
//!    runs instead of getting 409 until the lease ran out (found by the soak, `cm-soak`).
//!    A device command re-dispatched this way carries the same derived request id, so the
//!    daemon's journal answers it without running it twice.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use hyper::header::HeaderValue;
use hyper::{HeaderMap, Method, Response, StatusCode};

use super::error::ApiError;
use super::http::{Body, JsonReply};
use crate::auth::Principal;
use crate::secrets;
use crate::store::{IdempotencyClaim, Store, StoredResponse, TenantId};

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// Response header set on replays.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// How long a stored response is replayed.
pub const RETENTION_MS: u64 = 24 * 60 * 60 * 1000;
/// How long an unfinished claim blocks the key.
pub const LEASE_MS: u64 = 5 * 60 * 1000;

/// A validated key of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub tenant: TenantId,
    pub key: String,
}

impl IdempotencyKey {
    /// The key from the request headers, if any. 1..=255 visible ASCII chars, else 400.
    pub fn from_headers(tenant: &TenantId, headers: &HeaderMap) -> Result<Option<Self>, ApiError> {
        let Some(v) = headers.get(HEADER) else {
            return Ok(None);
        };
        let invalid = || {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1..255 visible ASCII characters (a UUID is ideal)",
            )
        };
        let key = v.to_str().map_err(|_| invalid())?.trim();
        if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid());
        }
        Ok(Some(IdempotencyKey {
            tenant: tenant.clone(),
            key: key.to_owned(),
        }))
    }

    /// A stable protocol request id (`i`) for a device command made under this key: the same
    /// key always yields the same id, so a re-dispatch is recognised by the daemon's journal.
    pub fn derived_request_id(&self) -> String {
        let digest = secrets::sha256(format!("{}\0{}", self.tenant, self.key).as_bytes());
        format!("idem-{}", &secrets::hex(&digest)[..24])
    }
}

/// Runs `handler` under the request's `Idempotency-Key` (if it has one).
pub async fn run<F, Fut>(
    store: &Arc<dyn Store>,
    principal: &Principal,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    handler: F,
) -> Result<Response<Body>, ApiError>
where
    F: FnOnce(Option<IdempotencyKey>) -> Fut,
    Fut: Future<Output = Result<JsonReply, ApiError>>,
{
    let Some(key) = IdempotencyKey::from_headers(&principal.tenant, headers)? else {
        return handler(None).await.map(JsonReply::into_response);
    };
    let Some(_in_flight) = InFlight::enter(store, &key) else {
        return Err(in_progress());
    };
    let fingerprint = fingerprint(method, path, body);
    let claim_once = || {
        let (store, key, fingerprint) = (store.clone(), key.clone(), fingerprint.clone());
        smol::unblock(move || {
            store.idempotency_claim(
                &key.tenant,
                &key.key,
                &fingerprint,
                crate::time::now_ms(),
                LEASE_MS,
            )
        })
    };
    let mut claim = claim_once().await?;
    if claim == IdempotencyClaim::InProgress {
        // Not in flight here, so nobody is working on it: a left-over claim (see step 6).
        tracing::info!(key = %key.key, "taking over a left-over idempotency claim");
        let (s, k) = (store.clone(), key.clone());
        smol::unblock(move || s.idempotency_release(&k.tenant, &k.key)).await?;
        claim = claim_once().await?;
    }
    match claim {
        IdempotencyClaim::Claimed => {}
        IdempotencyClaim::Replay(stored) => {
            let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
            let mut resp = JsonReply {
                status,
                body: stored.body,
            }
            .into_response();
            resp.headers_mut()
                .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
            return Ok(resp);
        }
        IdempotencyClaim::InProgress => return Err(in_progress()),
        IdempotencyClaim::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was already used for a different request (route or body); \
                 use a fresh key for a new request",
            ));
        }
    }
    let outcome = handler(Some(key.clone())).await;
    let store = store.clone();
    match outcome {
        Ok(reply) => {
            let stored = StoredResponse {
                status: reply.status.as_u16(),
                body: reply.body.clone(),
            };
            let expires = crate::time::now_ms().saturating_add(RETENTION_MS);
            let saved = smol::unblock(move || {
                store.idempotency_complete(&key.tenant, &key.key, &stored, expires)
            })
            .await;
            if let Err(e) = saved {
                // The change happened; only the replay record is missing. Say so in the log
                // rather than failing a request whose effect is already committed.
                tracing::warn!(error = %e, "could not store the idempotent response");
            }
            let mut resp = reply.into_response();
            resp.headers_mut()
                .insert(REPLAYED_HEADER, HeaderValue::from_static("false"));
            Ok(resp)
        }
        Err(err) => {
            let released =
                smol::unblock(move || store.idempotency_release(&key.tenant, &key.key)).await;
            if let Err(e) = released {
                tracing::warn!(error = %e, "could not release an idempotency key");
            }
            Err(err)
        }
    }
}

fn in_progress() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_key_in_progress",
        "a request with this Idempotency-Key is still running; retry when it has finished",
    )
}

/// Keys being handled by this process, per store (its address) and tenant.
static IN_FLIGHT: Mutex<BTreeSet<(usize, String, String)>> = Mutex::new(BTreeSet::new());

/// This process works on a key from [`InFlight::enter`] until the guard is dropped.
struct InFlight((usize, String, String));

impl InFlight {
    /// `None` if the key is already in flight here.
    fn enter(store: &Arc<dyn Store>, key: &IdempotencyKey) -> Option<InFlight> {
        let id = (
            Arc::as_ptr(store).cast::<()>() as usize,
            key.tenant.as_str().to_owned(),
            key.key.clone(),
        );
        let mut set = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(id.clone()).then_some(InFlight(id))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let mut data = Vec::with_capacity(method.as_str().len() + path.len() + body.len() + 2);
    data.extend_from_slice(method.as_str().as_bytes());
    data.push(b' ');
    data.extend_from_slice(path.as_bytes());
    data.push(b'\n');
    data.extend_from_slice(body);
    secrets::hex(&secrets::sha256(&data))
}
