//! `dispatch`: one decoded request in, at most one reply out.
//!
//! The tunnel hands every request frame that arrives after the handshake to
//! [`Dispatcher::handle`], each in its own task, so requests run concurrently and replies
//! correlate by `i` (the control plane may see them out of order, as with 0.1.50). Blocking
//! file-system work goes through the guards on the blocking pool (`smol::unblock`).
//!
//! **Where handlers are registered**: the single `match` in [`Dispatcher::handle`]. To add a
//! handler (sessions, ...), move its message from the "not supported yet" arm to an arm of
//! its own; if it changes the host, wrap it in [`Dispatcher::once`] like `md`/`rd`/`rn`.
//! Optional parts (git, config pushes) are given with `with_*` after [`Dispatcher::new`], so a
//! host that does not enable them says so in its replies instead of failing on start.
//!
//! # Git and config pushes
//!
//! Every `g*` request goes to the [`GitRunner`] (present only when `git` is on
//! `[process.allowlist]`); without one the typed reply says `o:0` with "git is not enabled on
//! this host: add git to [process.allowlist]" (`gt` carries it in `e`, the others in `m`:
//! fields 0.1.x control planes know). Requests that change the repository (`gi gk ga gp gh gm
//! gx`, `gc` create/delete, `gf` set) go through the idempotency path below; `gs`, `gc` list
//! and `gf` get do not. While git runs, its `gq` lines are queued on the link ([`Outbound`])
//! without waiting, ahead of the reply.
//!
//! `cc` goes to the [`ConfigApplier`] for the `cwd` root (on the blocking pool: it writes
//! files), through the idempotency path; its `cv` reply says applied or rejected with every
//! violation. Session-init payloads stay in the applier's
//! [`crate::config_apply::SessionInitStore`] until their session starts.
//!
//! # Sessions
//!
//! `si st sq sp sl jk sa` go to the [`SessionManager`] (present only when `opencode` is on
//! `[process.allowlist]`; without it `si`/`st` answer `sr o:0`, `sq` `sv o:0` and `jk` `jv
//! o:0`, with `m` "opencode_not_enabled", and `sp`/`sl` an `e INTERNAL`). `si`, `st` and `jk`
//! go through the idempotency path; `sp` needs none (a re-sent `sp` names a stream that
//! already exists, and is not prompted again). `sl`'s chunks are queued on the link
//! ([`Outbound`]); session output itself goes through the manager's durable outbox, not
//! through here. `sa` acknowledges output and has no reply.
//!
//! # Port proxy
//!
//! `pr` goes to the [`Proxy`] (see [`crate::proxy`]): a refusal or a small answer is the
//! reply; a streamed answer (`pv ss:1`, `ps`*, `pe`) goes through the link's bounded stream
//! lane ([`Outbound::send_stream`]) from a task of its own, so the request's slot is free
//! again at once. `pe` *from* the control plane cancels that stream (its client went away).
//!
//! # Replies and the two codecs
//!
//! Handlers build the native reply (errors carry a human-readable `m`). [`shape_reply`] then
//! makes it fit the peer: a JSON (0.1.x) control plane never gets `m` on `e` (0.1.50's daemon
//! never sent one), and the JSON codec itself leaves out native-only fields. Unsupported but
//! known types answer `e INTERNAL` (`m: "not_supported: <t>"` natively) so the control plane
//! fails the request at once instead of timing out; an unknown `t` answers `e PROTO` and the
//! connection stays up.
//!
//! Listings are sorted and paged (see [`crate::fs`]): `ds.k` carries the cursor of the next
//! page, absent on the last one, in both codecs. 0.1.50 only echoed the request's `k`; a 0.1.x
//! control plane passes `ds` through to its API caller as-is, so that caller can page by
//! sending `k` back as its `cursor`.
//!
//! # Idempotency
//!
//! A control plane that did not see a reply (the link dropped, the daemon restarted) re-sends
//! the request. Reads are harmless to repeat; a mutation is not (`rn a b` twice fails the second
//! time, a session started twice is two sessions). So a mutating request's reply is recorded
//! in the [`Journal`] under a *request key* **before** it is sent, and a request whose key is
//! already recorded is answered from the record without running again. Concurrent duplicates
//! wait for the first one (a per-key lock), so a re-send that overtakes the original cannot
//! run it twice either.
//!
//! The request key is, in order of preference:
//!
//! - `ik:<idempotency key>:<t>`: the native-only `ik` field a control plane of this generation
//!   puts on mutating requests ([`Message::idempotency_key`]). It survives control-plane
//!   restarts and reconnects, whatever `i` and session id the re-send carries.
//! - `<sid>:<i>:<t>`: for peers without `ik` (0.1.x JSON control planes, which never re-send).
//!   `i` alone is not enough: a control plane numbers requests from 1 again when it restarts,
//!   so a recorded `5:md` would answer an unrelated later `md` with id 5. The handshake's session
//!   id `sid` scopes the id to one control-plane session; a re-send within it is still caught.
//!
//! The record is the reply encoded in CBOR (full fidelity); a replay re-encodes it for the
//! current peer with the current request's `i`. Records expire after
//! `idempotency.retention_s` ([`Dispatcher::prune`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use codemantle_protocol::codec::{self, Codec};
use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::message::{
    BranchAction, DirEntry, DirList, DirListing, FsResult, GitBranchResult, GitCommitResult,
    GitConfigAction, GitConfigResult, GitLog, GitResult, GitStatusResult, JitKillResult,
    JitRenewResult, Message, SessionResult, SessionStatus,
};

use crate::config_apply::ConfigApplier;
use crate::fs;
use crate::git::{GitError, GitRunner};
use crate::guard::path::{GuardError, RootDir, Roots};
use crate::journal::{Journal, JournalError};
use crate::proxy::Proxy;
use crate::redact::redact_text;
use crate::session::SessionManager;

/// What a git request is answered with when git is not enabled (native and 0.1.x alike).
pub const GIT_NOT_ENABLED: &str = "git is not enabled on this host: add git to [process.allowlist]";

/// Longest `m` on an `e` frame (the wire limit, 1..=256 characters; bytes are never fewer).
const MAX_ERROR_TEXT_BYTES: usize = 256;

/// What a request needs to know about the link it arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The link's codec: CBOR for native control planes, JSON for 0.1.x.
    pub codec: Codec,
    /// The session id the control plane gave in `h2`.
    pub sid: String,
    /// Where a handler queues frames it sends before its reply (`gq` lines); `None` when
    /// nothing listens (tests), and the frames are dropped.
    pub outbound: Option<Outbound>,
}

/// Frames a handler sends on the link while it runs, ahead of its reply. Sending never waits:
/// the link task writes queued frames in order (they are shaped for the peer's codec there,
/// like replies). A frame queued after the link ended is dropped.
///
/// Long streams (proxied response bodies) use the *stream lane* instead
/// ([`Outbound::send_stream`]): a bounded channel the link pulls from as fast as it writes, so
/// a producer waits instead of piling frames up in memory.
#[derive(Clone)]
pub struct Outbound {
    tx: async_channel::Sender<Message>,
    lane: Option<async_channel::Sender<Message>>,
}

impl Outbound {
    /// Frames go into `tx`, the channel the link task also takes replies from.
    pub fn new(tx: async_channel::Sender<Message>) -> Outbound {
        Outbound { tx, lane: None }
    }

    /// Stream frames go into `lane`, a bounded channel the link task also takes frames from.
    pub fn with_stream_lane(mut self, lane: async_channel::Sender<Message>) -> Outbound {
        self.lane = Some(lane);
        self
    }

    /// Queue `msg` without waiting; `false` if the link is gone (the frame is dropped).
    pub fn send(&self, msg: Message) -> bool {
        self.tx.try_send(msg).is_ok()
    }

    /// Queue a frame of a long stream, waiting while the stream lane is full; `false` if the
    /// link is gone. Frames of one stream keep their order. Without a lane, like [`Self::send`].
    pub async fn send_stream(&self, msg: Message) -> bool {
        match &self.lane {
            Some(lane) => lane.send(msg).await.is_ok(),
            None => self.send(msg),
        }
    }
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("queued", &self.tx.len())
            .field("lane", &self.lane.as_ref().map(async_channel::Sender::len))
            .finish()
    }
}

/// Two handles are equal when they feed the same link.
impl PartialEq for Outbound {
    fn eq(&self, other: &Outbound) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

impl Eq for Outbound {}

/// Routes requests to handlers; see the module doc. Cheap to share (`Arc`).
pub struct Dispatcher {
    roots: Arc<Roots>,
    journal: Arc<Journal>,
    in_flight: KeyedLocks,
    /// Present when `git` is on the process allowlist.
    git: Option<Arc<GitRunner>>,
    /// Config pushes for the `cwd` root; `None` only in tests that do not need it.
    config: Option<Arc<ConfigApplier>>,
    /// Present when `opencode` is on the process allowlist.
    sessions: Option<Arc<SessionManager>>,
    /// The port proxy (`pr`); without it `pr` is answered `e INTERNAL`.
    proxy: Option<Arc<Proxy>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("roots", &self.roots)
            .field("journal", &self.journal)
            .field("git", &self.git)
            .field("config", &self.config)
            .field("sessions", &self.sessions)
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

/// The envelope facts of a request, kept before the message is moved into its handler.
struct Meta {
    t: String,
    request_id: Option<u32>,
    idempotency_key: Option<String>,
}

impl Dispatcher {
    /// A dispatcher for file requests; add the optional parts with the `with_*` methods.
    pub fn new(roots: Arc<Roots>, journal: Arc<Journal>) -> Dispatcher {
        Dispatcher {
            roots,
            journal,
            in_flight: KeyedLocks::default(),
            git: None,
            config: None,
            sessions: None,
            proxy: None,
        }
    }

    /// Port-proxy requests (`pr`, and `pe` cancelling a stream) go to `proxy`.
    pub fn with_proxy(mut self, proxy: Arc<Proxy>) -> Dispatcher {
        self.proxy = Some(proxy);
        self
    }

    /// Session requests (`si st sq sp sl jk sa`) go to `sessions`. Without it they are
    /// answered `o:0` (`opencode_not_enabled`) or `e INTERNAL`.
    pub fn with_sessions(mut self, sessions: Arc<SessionManager>) -> Dispatcher {
        self.sessions = Some(sessions);
        self
    }

    /// Git requests run through `runner`. Without it they are answered `o:0` with
    /// [`GIT_NOT_ENABLED`].
    pub fn with_git(mut self, runner: Arc<GitRunner>) -> Dispatcher {
        self.git = Some(runner);
        self
    }

    /// Config pushes (`cc`) are checked and applied by `applier`. Without it `cc` is
    /// answered `e INTERNAL` (`not_supported: cc`).
    pub fn with_config_applier(mut self, applier: Arc<ConfigApplier>) -> Dispatcher {
        self.config = Some(applier);
        self
    }

    /// The config applier, whose session-init store a session start takes its payload from.
    pub fn config_applier(&self) -> Option<&Arc<ConfigApplier>> {
        self.config.as_ref()
    }

    /// The journal (for flushing at shutdown).
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// Handle one request from the control plane; `None` when the message expects no reply.
    /// The reply is native-shaped: pass it through [`shape_reply`] before encoding.
    pub async fn handle(&self, msg: Message, peer: &Peer) -> Option<Message> {
        let meta = Meta {
            t: msg.type_tag().to_owned(),
            request_id: msg.request_id(),
            idempotency_key: msg.idempotency_key().map(str::to_owned),
        };
        let reply = match msg {
            // -- Files, through the path guard ---------------------------------------------
            Message::DirList(req) => self.list_dir(req).await,
            Message::MakeDir(req) => {
                let id = req.request_id;
                self.once(&meta, peer, || async move {
                    self.fs_op(id, MessageKindOf::MakeDir, move |roots| {
                        fs::make_dir(roots.get(&req.root)?, &req.path).map(drop)
                    })
                    .await
                })
                .await
            }
            Message::RemoveDir(req) => {
                let id = req.request_id;
                self.once(&meta, peer, || async move {
                    self.fs_op(id, MessageKindOf::RemoveDir, move |roots| {
                        fs::remove_dir(roots.get(&req.root)?, &req.path, req.recursive)
                    })
                    .await
                })
                .await
            }
            Message::Rename(req) => {
                let id = req.request_id;
                self.once(&meta, peer, || async move {
                    self.fs_op(id, MessageKindOf::Rename, move |roots| {
                        fs::rename(roots.get(&req.root)?, &req.source, &req.dest, req.overwrite)
                    })
                    .await
                })
                .await
            }

            // -- Config pushes, through the config applier -----------------------------------
            Message::ConfigPush(push) => match &self.config {
                Some(applier) => {
                    let applier = Arc::clone(applier);
                    self.once(&meta, peer, || async move {
                        let result = smol::unblock(move || applier.apply(&push, now_ms())).await;
                        Message::ConfigResult(result)
                    })
                    .await
                }
                None => Message::error(
                    ErrorCode::Internal,
                    meta.request_id,
                    Some("not_supported: cc"),
                ),
            },

            // -- Git, through the git runner (and so the process guard) ----------------------
            Message::GitStatus(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    let log = git_log_sink(peer);
                    let done = git.status(root, &req, &log).await;
                    git_reply(&meta.t, req.request_id, done.map(Message::GitStatusResult))
                }
            },
            Message::GitInit(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    self.once(&meta, peer, || async {
                        let log = git_log_sink(peer);
                        let done = git.init(root, &req, &log).await;
                        git_reply(&meta.t, req.request_id, done.map(Message::GitInitResult))
                    })
                    .await
                }
            },
            Message::GitClone(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    self.once(&meta, peer, || async {
                        let log = git_log_sink(peer);
                        let done = git.clone_repo(root, &req, &log).await;
                        git_reply(&meta.t, req.request_id, done.map(Message::GitCloneResult))
                    })
                    .await
                }
            },
            Message::GitAdd(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    self.once(&meta, peer, || async {
                        let log = git_log_sink(peer);
                        let done = git.add(root, &req, &log).await;
                        git_reply(&meta.t, req.request_id, done.map(Message::GitAddResult))
                    })
                    .await
                }
            },
            Message::GitCommit(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    self.once(&meta, peer, || async {
                        let log = git_log_sink(peer);
                        let done = git.commit(root, &req, &log).await;
                        git_reply(&meta.t, req.request_id, done.map(Message::GitCommitResult))
                    })
                    .await
                }
            },
            Message::GitPush(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    self.once(&meta, peer, || async {
                        let log = git_log_sink(peer);
                        let done = git.push(root, &req, &log).await;
                        git_reply(&meta.t, req.request_id, done.map(Message::GitPushResult))
                    })
                    .await
                }
            },
            Message::GitPull(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    self.once(&meta, peer, || async {
                        let log = git_log_sink(peer);
                        let done = git.pull(root, &req, &log).await;
                        git_reply(&meta.t, req.request_id, done.map(Message::GitPullResult))
                    })
                    .await
                }
            },
            Message::GitBranch(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    let run = || async {
                        let log = git_log_sink(peer);
                        let done = git.branch(root, &req, &log).await;
                        git_reply(&meta.t, req.request_id, done.map(Message::GitBranchResult))
                    };
                    match req.action.unwrap_or(BranchAction::List) {
                        BranchAction::List => run().await,
                        BranchAction::Create | BranchAction::Delete => {
                            self.once(&meta, peer, run).await
                        }
                    }
                }
            },
            Message::GitCheckout(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    self.once(&meta, peer, || async {
                        let log = git_log_sink(peer);
                        let done = git.checkout(root, &req, &log).await;
                        git_reply(
                            &meta.t,
                            req.request_id,
                            done.map(Message::GitCheckoutResult),
                        )
                    })
                    .await
                }
            },
            Message::GitConfig(req) => match self.git_for(&meta.t, req.request_id, &req.root) {
                Err(reply) => *reply,
                Ok((git, root)) => {
                    let run = || async {
                        let log = git_log_sink(peer);
                        let done = git.config(root, &req, &log).await;
                        git_reply(&meta.t, req.request_id, done.map(Message::GitConfigResult))
                    };
                    match req.action {
                        GitConfigAction::Get => run().await,
                        GitConfigAction::Set => self.once(&meta, peer, run).await,
                    }
                }
            },

            // -- Sessions, through the session manager (and so the process guard) -----------
            Message::StartSession(req) => match &self.sessions {
                Some(sessions) => self.once(&meta, peer, || sessions.start(req)).await,
                None => sessions_disabled(Message::SessionResult(SessionResult {
                    request_id: req.request_id,
                    session_id: req.session_id,
                    ok: false,
                    reason: Some(OPENCODE_NOT_ENABLED.to_owned()),
                    url: None,
                })),
            },
            Message::StopSession(req) => match &self.sessions {
                Some(sessions) => self.once(&meta, peer, || sessions.stop(req)).await,
                None => sessions_disabled(Message::SessionResult(SessionResult {
                    request_id: req.request_id,
                    session_id: req.session_id,
                    ok: false,
                    reason: Some(OPENCODE_NOT_ENABLED.to_owned()),
                    url: None,
                })),
            },
            Message::SessionStatusQuery(req) => match &self.sessions {
                Some(sessions) => sessions.status(req).await,
                None => sessions_disabled(Message::SessionStatus(SessionStatus {
                    request_id: req.request_id,
                    running: false,
                    session_id: None,
                    port: None,
                    pid: None,
                    url: None,
                    reason: Some(OPENCODE_NOT_ENABLED.to_owned()),
                    protection: None,
                })),
            },
            Message::Prompt(req) => match &self.sessions {
                Some(sessions) => return sessions.prompt(req).await,
                None => Message::error(
                    ErrorCode::Internal,
                    meta.request_id,
                    Some(OPENCODE_NOT_ENABLED),
                ),
            },
            Message::ReplayLog(req) => match &self.sessions {
                Some(sessions) => {
                    let frames = sessions.replay(&req);
                    match &peer.outbound {
                        Some(out) => {
                            for frame in frames {
                                out.send(frame);
                            }
                        }
                        None => tracing::debug!("sl replay dropped: no link to send it on"),
                    }
                    return None;
                }
                None => Message::error(
                    ErrorCode::Internal,
                    meta.request_id,
                    Some(OPENCODE_NOT_ENABLED),
                ),
            },
            Message::JitKill(req) => match &self.sessions {
                Some(sessions) => self.once(&meta, peer, || sessions.kill_switch(req)).await,
                None => sessions_disabled(Message::JitKillResult(JitKillResult {
                    request_id: req.request_id,
                    ok: false,
                    affected: 0,
                    message: Some(OPENCODE_NOT_ENABLED.to_owned()),
                })),
            },
            Message::JitRenew(req) => match &self.sessions {
                Some(sessions) => {
                    self.once(&meta, peer, || sessions.renew_credential(req))
                        .await
                }
                None => sessions_disabled(Message::JitRenewResult(JitRenewResult {
                    request_id: req.request_id,
                    ok: false,
                    expires_at_ms: None,
                    message: Some(OPENCODE_NOT_ENABLED.to_owned()),
                })),
            },

            // -- Port proxy ------------------------------------------------------------------
            Message::ProxyRequest(req) if self.proxy.is_some() => {
                let proxy = self.proxy.as_ref()?;
                return proxy.handle(req, peer).await;
            }
            // `pw` from the control plane: credit for a streamed answer.
            Message::ProxyWindow(w) => {
                if let Some(proxy) = &self.proxy {
                    proxy.credit(&peer.sid, w.request_id, w.bytes);
                }
                return None;
            }
            // `pe` from the control plane: its client left; stop streaming that answer.
            Message::ProxyEnd(end) => {
                if let Some(proxy) = &self.proxy {
                    proxy.cancel(&peer.sid, end.request_id);
                }
                return None;
            }

            // -- Known requests this daemon does not carry out yet ---------------------------
            Message::ProxyRequest(_) | Message::SetupStatusQuery(_) | Message::SetupSave(_) => {
                Message::error(
                    ErrorCode::Internal,
                    meta.request_id,
                    Some(&format!("not_supported: {}", meta.t)),
                )
            }

            // -- No reply expected ---------------------------------------------------------
            // Output acks: the acknowledged chunks leave the journal.
            Message::StreamAck(ack) => {
                if let Some(sessions) = &self.sessions {
                    sessions.ack(&ack);
                }
                return None;
            }

            // -- Not a request -------------------------------------------------------------
            Message::Unknown { .. } => Message::error(
                ErrorCode::Proto,
                meta.request_id,
                Some(&format!("unknown message type `{}`", meta.t)),
            ),
            _ => Message::error(
                ErrorCode::Proto,
                meta.request_id,
                Some(&format!(
                    "`{}` is not a request the daemon accepts from the control plane",
                    meta.t
                )),
            ),
        };
        Some(reply)
    }

    /// `dr` → `ds`, or `e`.
    async fn list_dir(&self, req: DirList) -> Message {
        let roots = Arc::clone(&self.roots);
        let id = req.request_id;
        let result = smol::unblock(move || {
            let cursor = req.cursor.as_deref().filter(|k| !k.is_empty());
            fs::list_dir(
                roots.get(&req.root)?,
                &req.path,
                usize::from(req.limit),
                cursor,
            )
        })
        .await;
        match result {
            Ok(listing) => {
                if listing.skipped_non_utf8 + listing.skipped_other > 0 {
                    tracing::debug!(
                        i = id,
                        non_utf8 = listing.skipped_non_utf8,
                        other = listing.skipped_other,
                        "listing skipped entries"
                    );
                }
                Message::DirListing(DirListing {
                    request_id: id,
                    cursor: listing.next_cursor,
                    entries: listing.entries.into_iter().map(wire_entry).collect(),
                })
            }
            Err(e) => guard_error("dr", id, &e),
        }
    }

    /// The git runner and the root `alias` names, or the reply that ends the request: `o:0`
    /// with [`GIT_NOT_ENABLED`] when git is off, `e ROOT` for an unknown root. Checked before
    /// the idempotency path, so a refusal is not recorded as the request's outcome.
    fn git_for(
        &self,
        t: &str,
        id: u32,
        alias: &str,
    ) -> Result<(&GitRunner, &RootDir), Box<Message>> {
        let Some(git) = &self.git else {
            tracing::debug!(t, i = id, "git request refused: git is not allowlisted");
            return Err(Box::new(git_disabled_reply(t, id)));
        };
        match self.roots.get(alias) {
            Ok(root) => Ok((git, root)),
            Err(e) => Err(Box::new(guard_error(t, id, &e))),
        }
    }

    /// Run a file operation on the blocking pool; `mr`/`rr`/`rp` with `o:1`, or `e`.
    async fn fs_op(
        &self,
        id: u32,
        kind: MessageKindOf,
        op: impl FnOnce(&Roots) -> Result<(), GuardError> + Send + 'static,
    ) -> Message {
        let roots = Arc::clone(&self.roots);
        match smol::unblock(move || op(&roots)).await {
            Ok(()) => {
                let ok = FsResult {
                    request_id: id,
                    ok: true,
                };
                match kind {
                    MessageKindOf::MakeDir => Message::MakeDirResult(ok),
                    MessageKindOf::RemoveDir => Message::RemoveDirResult(ok),
                    MessageKindOf::Rename => Message::RenameResult(ok),
                }
            }
            Err(e) => guard_error(kind.tag(), id, &e),
        }
    }

    /// Run a mutating request at most once per request key; see the module doc. `run` is only
    /// called if no outcome is recorded; its reply is recorded before it is returned.
    async fn once<F, Fut>(&self, meta: &Meta, peer: &Peer, run: F) -> Message
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Message>,
    {
        let Some(key) = request_key(meta, peer) else {
            // No `i`: nothing to correlate a re-send with (cannot happen for v=1 requests).
            return run().await;
        };
        let _serial = self.in_flight.lock(&key).await;
        let now = now_s();
        let journal = Arc::clone(&self.journal);
        let lookup_key = key.clone();
        match smol::unblock(move || journal.lookup(&lookup_key, now)).await {
            Ok(Some(record)) => {
                if let Some(reply) = replay(&record, meta.request_id) {
                    tracing::info!(key = %key, "re-sent request answered from the journal, not run again");
                    return reply;
                }
                tracing::error!(key = %key, "journal record is unreadable; refusing to run the request again");
                return Message::error(
                    ErrorCode::Internal,
                    meta.request_id,
                    Some("journal record unreadable; the request may already have run"),
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(key = %key, "journal lookup failed: {e}");
                return Message::error(
                    ErrorCode::Internal,
                    meta.request_id,
                    Some("journal unavailable; not running a mutating request that could repeat"),
                );
            }
        }
        let reply = run().await;
        match codec::encode(&reply, Codec::Cbor) {
            Ok(bytes) => {
                let journal = Arc::clone(&self.journal);
                let record_key = key.clone();
                let recorded =
                    smol::unblock(move || journal.record_outcome(&record_key, &bytes, now_s()))
                        .await;
                if let Err(e) = recorded {
                    // The operation happened; withholding its reply helps nobody.
                    tracing::error!(key = %key, "could not record the outcome (a re-send would run again): {e}");
                }
            }
            Err(e) => {
                tracing::error!(key = %key, "could not encode the outcome for the journal: {e}")
            }
        }
        reply
    }

    /// Delete expired outcome records (blocking: call on the blocking pool).
    pub fn prune(&self) -> Result<usize, JournalError> {
        self.journal.prune(now_s())
    }
}

/// The file operations that reply with an [`FsResult`].
#[derive(Debug, Clone, Copy)]
enum MessageKindOf {
    MakeDir,
    RemoveDir,
    Rename,
}

impl MessageKindOf {
    fn tag(self) -> &'static str {
        match self {
            MessageKindOf::MakeDir => "md",
            MessageKindOf::RemoveDir => "rd",
            MessageKindOf::Rename => "rn",
        }
    }
}

/// The journal key for a mutating request; see the module doc.
fn request_key(meta: &Meta, peer: &Peer) -> Option<String> {
    if let Some(ik) = &meta.idempotency_key {
        return Some(format!("ik:{ik}:{}", meta.t));
    }
    let i = meta.request_id?;
    Some(format!("{}:{i}:{}", peer.sid, meta.t))
}

/// A recorded reply, re-addressed to the request id `id`.
fn replay(record: &[u8], id: Option<u32>) -> Option<Message> {
    let msg = codec::decode(record, Codec::Cbor).ok()?;
    Some(match id {
        Some(id) => with_request_id(msg, id),
        None => msg,
    })
}

/// `msg` with its `i` set to `id` (replies only; other kinds are returned unchanged).
pub fn with_request_id(mut msg: Message, id: u32) -> Message {
    match &mut msg {
        Message::DirListing(r) => r.request_id = id,
        Message::MakeDirResult(r) | Message::RemoveDirResult(r) | Message::RenameResult(r) => {
            r.request_id = id
        }
        Message::SessionResult(r) => r.request_id = id,
        Message::SessionStatus(r) => r.request_id = id,
        Message::SetupStatus(r) => r.request_id = id,
        Message::SetupSaveResult(r) => r.request_id = id,
        Message::ConfigResult(r) => r.request_id = id,
        Message::JitKillResult(r) => r.request_id = id,
        Message::JitRenewResult(r) => r.request_id = id,
        Message::GitStatusResult(r) => r.request_id = id,
        Message::GitInitResult(r)
        | Message::GitCloneResult(r)
        | Message::GitAddResult(r)
        | Message::GitPushResult(r)
        | Message::GitPullResult(r)
        | Message::GitCheckoutResult(r) => r.request_id = id,
        Message::GitCommitResult(r) => r.request_id = id,
        Message::GitBranchResult(r) => r.request_id = id,
        Message::GitConfigResult(r) => r.request_id = id,
        Message::ProxyResponse(r) => r.request_id = id,
        Message::Error(e) => e.request_id = Some(id),
        _ => {}
    }
    msg
}

/// `m` of session replies when `opencode` is not allowlisted.
pub const OPENCODE_NOT_ENABLED: &str = "opencode_not_enabled";

/// A session reply on a host without sessions (logged, so the operator finds the fix).
fn sessions_disabled(reply: Message) -> Message {
    tracing::debug!(
        t = reply.type_tag(),
        "session request refused: opencode is not on [process.allowlist]"
    );
    reply
}

/// Make a native reply fit the peer's codec. JSON (0.1.x) peers get `e` without `m`: 0.1.50's
/// daemon never sent one. (Native-only fields are left out by the JSON codec itself.)
pub fn shape_reply(msg: Message, codec: Codec) -> Message {
    match (codec, msg) {
        (Codec::Json, Message::Error(mut e)) => {
            e.message = None;
            Message::Error(e)
        }
        (_, msg) => msg,
    }
}

/// The `gq` sink of a git request: each line is queued on the link without waiting (the git
/// runner calls it from the request's task, which must not block).
fn git_log_sink(peer: &Peer) -> impl Fn(GitLog) + Send + Sync + 'static {
    let outbound = peer.outbound.clone();
    move |line: GitLog| {
        if let Some(out) = &outbound {
            out.send(Message::GitLog(line));
        }
    }
}

/// The typed git reply, or an `e` frame when `p` failed the path guard.
fn git_reply(t: &str, id: u32, done: Result<Message, GitError>) -> Message {
    match done {
        Ok(reply) => reply,
        Err(GitError::Path(e)) => guard_error(t, id, &e),
    }
}

/// `o:0` with [`GIT_NOT_ENABLED`] in the reply type of git request `t` (`gt` has no `m`, so
/// the text goes in `e` there).
fn git_disabled_reply(t: &str, id: u32) -> Message {
    let text = Some(GIT_NOT_ENABLED.to_owned());
    let plain = GitResult {
        request_id: id,
        ok: false,
        message: text.clone(),
    };
    match t {
        "gs" => Message::GitStatusResult(GitStatusResult {
            request_id: id,
            ok: false,
            branch: None,
            added: None,
            modified: None,
            untracked: None,
            deleted: None,
            conflict: None,
            error: text,
        }),
        "gp" => Message::GitCommitResult(GitCommitResult {
            request_id: id,
            ok: false,
            hash: None,
            message: text,
        }),
        "gc" => Message::GitBranchResult(GitBranchResult {
            request_id: id,
            ok: false,
            branches: None,
            current: None,
            message: text,
        }),
        "gf" => Message::GitConfigResult(GitConfigResult {
            request_id: id,
            ok: false,
            name: None,
            email: None,
            helper: None,
            auth_ready: None,
            message: text,
        }),
        "gi" => Message::GitInitResult(plain),
        "gk" => Message::GitCloneResult(plain),
        "ga" => Message::GitAddResult(plain),
        "gh" => Message::GitPushResult(plain),
        "gm" => Message::GitPullResult(plain),
        _ => Message::GitCheckoutResult(plain),
    }
}

/// An `e` frame for a guard failure: its wire code, and natively the reason (redacted, cut to
/// the wire limit).
fn guard_error(t: &str, id: u32, e: &GuardError) -> Message {
    let code = e.wire_code();
    let text = error_text(&e.to_string());
    if code == ErrorCode::Internal {
        tracing::warn!(t, i = id, code = code.as_str(), "{text}");
    } else {
        tracing::debug!(t, i = id, code = code.as_str(), "{text}");
    }
    Message::error(code, Some(id), Some(&text))
}

/// Redacted, at most [`MAX_ERROR_TEXT_BYTES`] bytes (cut at a character boundary), non-empty.
fn error_text(text: &str) -> String {
    let mut text = redact_text(text);
    if text.len() > MAX_ERROR_TEXT_BYTES {
        let mut end = MAX_ERROR_TEXT_BYTES - '…'.len_utf8();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    if text.is_empty() {
        text.push_str("error");
    }
    text
}

fn wire_entry(e: fs::Entry) -> DirEntry {
    match e.kind {
        fs::EntryKind::Dir => DirEntry::Dir { name: e.name },
        fs::EntryKind::File => DirEntry::File {
            name: e.name,
            size: e.size,
            mtime_ms: u64::from(e.mtime_s) * 1000,
        },
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it): the `at` of replies.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One async lock per key, held while a request with that key runs; entries are removed when
/// the last holder leaves, so the map only holds keys in flight.
#[derive(Default)]
struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<smol::lock::Mutex<()>>>>,
}

struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    lock: Arc<smol::lock::Mutex<()>>,
    guard: Option<smol::lock::MutexGuardArc<()>>,
}

impl KeyedLocks {
    async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(key.to_owned()).or_default())
        };
        let guard = lock.lock_arc().await;
        KeyGuard {
            locks: self,
            key: key.to_owned(),
            lock,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.guard = None;
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map and this guard hold it: nobody else is waiting (waiters clone it under
        // the map lock, which we hold).
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(t: &str, i: Option<u32>, ik: Option<&str>) -> Meta {
        Meta {
            t: t.to_owned(),
            request_id: i,
            idempotency_key: ik.map(str::to_owned),
        }
    }

    #[test]
    fn request_keys() {
        let peer = Peer {
            codec: Codec::Cbor,
            sid: "SidSidSidSid".to_owned(),
            outbound: None,
        };
        assert_eq!(
            request_key(&meta("md", Some(5), None), &peer).as_deref(),
            Some("SidSidSidSid:5:md")
        );
        assert_eq!(
            request_key(&meta("md", Some(5), Some("ikKey0001")), &peer).as_deref(),
            Some("ik:ikKey0001:md")
        );
        assert_eq!(request_key(&meta("md", None, None), &peer), None);
    }

    #[test]
    fn json_errors_lose_their_message() {
        let e = Message::error(ErrorCode::Path, Some(3), Some("why"));
        assert_eq!(shape_reply(e.clone(), Codec::Cbor), e);
        assert_eq!(
            shape_reply(e, Codec::Json),
            Message::error(ErrorCode::Path, Some(3), None)
        );
    }

    #[test]
    fn replayed_replies_take_the_new_id() {
        let ok = Message::RenameResult(FsResult {
            request_id: 1,
            ok: true,
        });
        let record = codec::encode(&ok, Codec::Cbor).unwrap();
        assert_eq!(
            replay(&record, Some(9)),
            Some(Message::RenameResult(FsResult {
                request_id: 9,
                ok: true
            }))
        );
        assert_eq!(replay(b"\xff", Some(9)), None);
    }

    #[test]
    fn error_text_fits_the_wire() {
        let long = "é".repeat(300);
        let t = error_text(&long);
        assert!(t.len() <= MAX_ERROR_TEXT_BYTES && t.ends_with('…'));
        assert_eq!(error_text(""), "error");
        assert!(!error_text("x token=hunter2").contains("hunter2"));
    }
}
