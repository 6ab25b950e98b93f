//! `tunnel`: the daemon's one outbound WebSocket to the control plane, kept up for the life of
//! the process.
//!
//! [`Tunnel::run`] dials, authenticates (`h1`/`h2`), serves requests through the
//! [`Dispatcher`], and when the link ends waits a [`Backoff`] delay and dials again, until
//! [`Shutdown`] fires. The daemon never listens on a port: everything arrives over this link.
//!
//! # Why CBOR first, with a JSON fallback
//!
//! Native control planes of this generation speak CBOR in binary frames: smaller frames, raw
//! bytes for proxy bodies, and unknown keys ignored, so both sides can add optional fields.
//! CodeMantle 0.1.x control planes parse every frame as JSON with strict key whitelists. There
//! is no version negotiation in v=1, so the daemon finds out by trying: it sends its `h1` as
//! CBOR, and a 0.1.x control plane answers with what it sends for unparseable input — a text
//! frame `{"v":1,"t":"e","c":"PROTO"}` and close 1002. Any of those three before `h2` (a text
//! frame, `e PROTO`, close 1002) means "this is a JSON peer": the daemon dials again at once
//! speaking JSON, and keeps JSON for that server for the rest of the process (logged once).
//! It costs one extra round trip per process start against old control planes and nothing
//! against new ones.
//!
//! # Liveness: why 3×hb
//!
//! The control plane states its heartbeat `hb` (5..=120 s) in `h2` and pings at that interval;
//! the daemon sends telemetry `p` and a WebSocket ping every `hb` as well, so a healthy link
//! carries traffic in both directions at least once per `hb`. A link with no inbound frame of
//! any kind (message, ping or pong) for 3×hb is declared dead and dropped: one lost or late
//! heartbeat is tolerated, two in a row are not, and a half-open TCP connection (a NAT that
//! forgot us, a control plane that crashed without a FIN) is noticed within 3×hb instead of
//! the kernel's keepalive hours. 0.1.50 used max(15 s, 3×hb) the same way.
//!
//! # Reconnect
//!
//! [`Backoff`] with full jitter (base and cap from `[reconnect]`, default 1 s..30 s); the
//! attempt counter resets only after a link stayed up `stable_after_s`. A handshake that the
//! control plane refuses (`e AUTH`, `e UPDATE_REQUIRED`, close 1008) cannot be fixed by
//! retrying, so the daemon logs at error what the operator must do and retries at the cap.
//! No `h2` within `handshake_timeout_s` (counted from the start of the dial) is a failed
//! attempt like any other.

mod host;
mod link;
pub mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codemantle_protocol::codec::Codec;
use codemantle_protocol::message::Message;

use crate::backoff::Backoff;
use crate::config::DaemonConfig;
use crate::dispatch::Dispatcher;
use crate::redact::Secret;

pub use host::{HostFacts, fnv1a_utf16, rss_bytes, telemetry};
pub use tls::TrustSource;

/// How often expired idempotency records are pruned from the journal.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Something the tunnel did; passed to the [`EventHook`] (systemd status, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelEvent {
    /// Dialling the control plane with this codec.
    Dialing { codec: Codec },
    /// The control plane speaks only JSON (0.1.x); the daemon switched for good.
    JsonFallback,
    /// Handshake done: the link is up.
    Connected { sid: String, hb: u64, codec: Codec },
    /// The link (or the attempt) ended.
    Disconnected { reason: String },
    /// The control plane refused this device; `code` is `AUTH`, `UPDATE_REQUIRED` or `1008`.
    Rejected { code: String },
    /// Waiting this long before the next dial.
    Retrying { delay: Duration, attempt: u32 },
}

/// Called for every [`TunnelEvent`], from the tunnel's task; keep it quick.
pub type EventHook = Arc<dyn Fn(&TunnelEvent) + Send + Sync>;

/// Frames the daemon sends on its own initiative and keeps until the control plane
/// acknowledges them (session output `sc`, acknowledged by `sa`; see
/// [`crate::session::stream`]). The link pulls from it while it is up, so frames produced
/// while no link is up simply wait, and a new link starts by re-sending what the last one did
/// not get acknowledged.
pub trait DurableOutbox: Send + Sync {
    /// A link is up (handshake done): queue every unacknowledged frame again, in order.
    fn link_up(&self);
    /// The next frame to send; waits while there is none. Cancel-safe: a frame is taken off
    /// the queue only when the future returns it.
    fn next_frame(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Message> + Send + '_>>;
}

/// Why the tunnel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
}

/// Fires [`Shutdown`] for everyone holding a clone of it.
#[derive(Debug)]
pub struct ShutdownTrigger(async_channel::Sender<()>);

/// Resolves when the daemon is asked to stop.
#[derive(Debug, Clone)]
pub struct Shutdown(async_channel::Receiver<()>);

/// A connected trigger/listener pair.
pub fn shutdown_pair() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = async_channel::bounded(1);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Ask everything holding the paired [`Shutdown`] to stop.
    pub fn trigger(&self) {
        self.0.close();
    }
}

impl Shutdown {
    /// Wait until shutdown is triggered (or the trigger is dropped).
    pub async fn wait(&self) {
        let _ = self.0.recv().await;
    }

    /// Whether shutdown was triggered.
    pub fn is_triggered(&self) -> bool {
        self.0.is_closed()
    }
}

/// The local ports announced to the control plane (`pl`). Seeded from `exposed_ports`; later
/// owners (sessions) call [`ExposedPorts::set`] and the live link sends the new list.
#[derive(Debug)]
pub struct ExposedPorts {
    ports: Mutex<Vec<u16>>,
    changed_tx: async_channel::Sender<()>,
    changed_rx: async_channel::Receiver<()>,
}

impl ExposedPorts {
    pub fn new(initial: Vec<u16>) -> ExposedPorts {
        let (changed_tx, changed_rx) = async_channel::bounded(1);
        ExposedPorts {
            ports: Mutex::new(normalise_ports(initial)),
            changed_tx,
            changed_rx,
        }
    }

    /// Replace the list (sorted, de-duplicated, at most 64 kept); the link announces it.
    pub fn set(&self, ports: Vec<u16>) {
        *self.ports.lock().unwrap_or_else(|p| p.into_inner()) = normalise_ports(ports);
        let _ = self.changed_tx.try_send(());
    }

    /// The current list.
    pub fn get(&self) -> Vec<u16> {
        self.ports.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn changed(&self) {
        let _ = self.changed_rx.recv().await;
    }
}

fn normalise_ports(mut ports: Vec<u16>) -> Vec<u16> {
    ports.retain(|p| *p != 0);
    ports.sort_unstable();
    ports.dedup();
    ports.truncate(codemantle_protocol::limits::MAX_PORTS);
    ports
}

/// The tunnel: configuration, credentials and the dispatcher, for the life of the process.
pub struct Tunnel {
    config: Arc<DaemonConfig>,
    key: Secret,
    dispatcher: Arc<Dispatcher>,
    tls: Option<Arc<rustls::ClientConfig>>,
    facts: HostFacts,
    ports: Arc<ExposedPorts>,
    /// Set once a control plane showed it speaks only JSON; never cleared.
    json_only: AtomicBool,
    started: Instant,
    hook: EventHook,
    /// Session output waiting for the link ([`Tunnel::with_outbox`]).
    outbox: Option<Arc<dyn DurableOutbox>>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("server", &self.config.server.url)
            .field("device", &self.config.device.id)
            .field("json_only", &self.json_only)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    /// Build the tunnel (reads the TLS trust store for `wss://`). `started` is when the
    /// process started (telemetry uptime).
    pub fn new(
        config: Arc<DaemonConfig>,
        key: Secret,
        dispatcher: Arc<Dispatcher>,
        started: Instant,
        hook: EventHook,
    ) -> Result<Tunnel, TunnelError> {
        let tls = if config.server.url.tls {
            let (client, trust) = tls::client_config(&config.server)?;
            if trust == TrustSource::BuiltIn {
                tracing::warn!(
                    "no system CA bundle found (looked for {}); trusting the built-in Mozilla roots — install ca-certificates or set server.ca_file",
                    tls::SYSTEM_BUNDLES.join(", ")
                );
            } else {
                tracing::info!(trust = %trust, "TLS trust");
            }
            Some(Arc::new(client))
        } else {
            None
        };
        let ports = Arc::new(ExposedPorts::new(config.exposed_ports.clone()));
        Ok(Tunnel {
            config,
            key,
            dispatcher,
            tls,
            facts: HostFacts::current(),
            ports,
            json_only: AtomicBool::new(false),
            started,
            hook,
            outbox: None,
        })
    }

    /// Send `outbox`'s frames on every link, re-sending the unacknowledged ones after each
    /// (re)connect.
    pub fn with_outbox(mut self, outbox: Arc<dyn DurableOutbox>) -> Tunnel {
        self.outbox = Some(outbox);
        self
    }

    /// The announced ports (for whoever opens them).
    pub fn exposed_ports(&self) -> Arc<ExposedPorts> {
        Arc::clone(&self.ports)
    }

    /// The codec the next dial uses.
    pub fn codec(&self) -> Codec {
        if self.json_only.load(Ordering::Relaxed) {
            Codec::Json
        } else {
            Codec::Cbor
        }
    }

    fn emit(&self, event: TunnelEvent) {
        (self.hook)(&event);
    }

    /// Keep the link up until `shutdown` fires; prune expired journal records meanwhile.
    pub async fn run(&self, shutdown: Shutdown) {
        let prune = async {
            loop {
                let dispatcher = Arc::clone(&self.dispatcher);
                match smol::unblock(move || dispatcher.prune()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "pruned expired request outcomes"),
                    Err(e) => tracing::warn!("pruning the journal failed: {e}"),
                }
                smol::Timer::after(PRUNE_EVERY).await;
            }
        };
        futures_lite::future::or(self.reconnect_loop(&shutdown), prune).await;
    }

    async fn reconnect_loop(&self, shutdown: &Shutdown) {
        let mut backoff = Backoff::from_config(&self.config.reconnect);
        loop {
            if shutdown.is_triggered() {
                return;
            }
            let codec = self.codec();
            self.emit(TunnelEvent::Dialing { codec });
            let end = futures_lite::future::or(self.link_once(codec, shutdown), async {
                shutdown.wait().await;
                link::LinkEnd::Shutdown
            })
            .await;
            match end {
                link::LinkEnd::Shutdown => return,
                link::LinkEnd::Fallback => {
                    if !self.json_only.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            "the control plane answered the binary (CBOR) handshake like a CodeMantle 0.1.x control plane; speaking JSON to it from now on"
                        );
                        self.emit(TunnelEvent::JsonFallback);
                    }
                    // A mode switch, not a failure: dial again at once.
                    continue;
                }
                link::LinkEnd::Rejected { code, reason } => {
                    tracing::error!(
                        "{reason}; retrying about every {} s",
                        backoff.cap().as_secs_f32().round()
                    );
                    backoff.on_rejected();
                    self.emit(TunnelEvent::Rejected { code });
                    self.emit(TunnelEvent::Disconnected { reason });
                }
                link::LinkEnd::Failed { reason } => {
                    tracing::warn!("connection attempt failed: {reason}");
                    self.emit(TunnelEvent::Disconnected { reason });
                }
                link::LinkEnd::Closed {
                    connected_at,
                    reason,
                } => {
                    tracing::warn!("disconnected: {reason}");
                    backoff.on_connected(connected_at);
                    backoff.on_disconnected(Instant::now());
                    self.emit(TunnelEvent::Disconnected { reason });
                }
            }
            let attempt = backoff.attempt();
            let delay = backoff.next_delay(random_u64());
            tracing::info!(
                "reconnecting in {} ms (attempt {})",
                delay.as_millis(),
                attempt + 1
            );
            self.emit(TunnelEvent::Retrying { delay, attempt });
            futures_lite::future::or(
                async {
                    smol::Timer::after(delay).await;
                },
                shutdown.wait(),
            )
            .await;
        }
    }
}

/// A random `u64` for back-off jitter (from the OS; time-derived if that fails).
fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    if getrandom::getrandom(&mut buf).is_ok() {
        return u64::from_le_bytes(buf);
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()) ^ d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_normalised_and_announced() {
        let ports = ExposedPorts::new(vec![8080, 0, 3000, 8080]);
        assert_eq!(ports.get(), [3000, 8080]);
        ports.set(vec![5000]);
        assert_eq!(ports.get(), [5000]);
        smol::block_on(ports.changed());
    }

    #[test]
    fn shutdown_fires_for_all_clones() {
        let (trigger, shutdown) = shutdown_pair();
        let other = shutdown.clone();
        assert!(!other.is_triggered());
        trigger.trigger();
        assert!(shutdown.is_triggered() && other.is_triggered());
        smol::block_on(other.wait());
    }
}
