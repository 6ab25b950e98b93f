//! CodeMantle control plane.
//!
//! Accepts daemon tunnels, binds each to a device identity, tracks liveness and exposes the HTTP
//! orchestration API. It owns authentication, tenant isolation, authorization, templates,
//! policy and the append-only event log. Its embedded store (sled) needs no external service.
//!
//! It must never reach a host except through that host's daemon and its guards.
