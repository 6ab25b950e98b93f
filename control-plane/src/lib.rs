//! CodeMantle control plane.
//!
//! Accepts daemon tunnels, binds each to a device identity, tracks liveness and exposes the HTTP
//! orchestration API. It owns authentication, tenant isolation, authorization, templates,
//! policy and the append-only event log. Its embedded store (sled) needs no external service.
//!
//! It must never reach a host except through that host's daemon and its guards.
//!
//! Map:
//! - [`store`]: the [`store::Store`] trait (all persistence; no storage types leak out) and the
//!   embedded sled backend. Every change and its event commit together.
//! - [`templates`]: agent template schema and validation, the compiler (runtime and session-init
//!   configs, bit-exact digests), signed config pushes, label selectors for fleet pushes.
//! - [`events`]: the event log's types, the live [`events::EventBus`], command records.
//! - [`auth`]: turning a request into a [`auth::Principal`] (tenant, role, actor); roles.
//! - [`presence`]: which devices are connected right now (filled by the tunnel).
//! - [`tunnel`]: the daemon side: `/ws` accept, handshake, liveness, and the [`tunnel::DeviceHub`]
//!   that dispatches commands to devices and correlates their replies.
//! - [`metrics`]: counters and histograms, rendered for Prometheus.
//! - [`api`]: the HTTP server (hyper on smol), routes, errors, idempotency, SSE, OpenAPI, and the
//!   `/ws` seam the tunnel plugs into.
//! - [`client`]: a minimal HTTP/1.1 client (the `codemantle` CLI and tests use it).
//! - [`config`]: TOML file + `CODEMANTLE_*` env + flags.
//! - [`registry`]: creating devices, tokens, tenants with their validation rules (shared by the
//!   API and the local admin commands).
//! - [`admin`]: local admin operations on a stopped server's data dir.
//! - [`sdnotify`]: systemd readiness and watchdog.
//! - [`secrets`], [`semver`], [`time`]: small helpers.
//!
//! Invariants: handlers never touch sled (only `dyn Store`); every entity change commits with
//! its event; a tenant never sees another tenant's resources (404, same as missing); secrets
//! are shown once and never logged or put in events (API token secrets are stored hashed,
//! device secrets raw because they are HMAC keys — the data dir is 0700).

pub mod admin;
pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod events;
pub mod metrics;
pub mod presence;
pub mod registry;
pub mod sdnotify;
pub mod secrets;
pub mod semver;
pub mod store;
pub mod streams;
pub mod templates;
pub mod time;
pub mod tunnel;
