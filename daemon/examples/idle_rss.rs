//! Bench: the daemon's resident memory while connected and idle.
//!
//! Starts a fake control plane on 127.0.0.1 (real handshake: `h1` verified, `h2` signed,
//! hb = 5 s so telemetry and pings flow), runs the given daemon binary against it with a config
//! in a temp dir, and samples `VmRSS` from `/proc/<pid>/status` once a second for the idle
//! period. Then it sends 200 directory listings and samples again, and finally stops the daemon
//! with SIGTERM (which must exit 0). Prints the figures.
//!
//! With `wss` as the third argument the fake control plane serves TLS with a test CA, and the
//! daemon trusts the system bundle plus that CA (`SSL_CERT_FILE` pointing at a copy of
//! `/etc/ssl/certs/ca-certificates.crt` with the test CA appended), so the figure includes a
//! full system root store and a live TLS session.
//!
//! ```text
//! cargo build --release -p codemantle-daemon
//! cargo run --release -p codemantle-daemon --example idle_rss -- target/release/codemantle-daemon 10 [ws|wss]
//! ```
//! (`daemon/bench/idle-rss.sh` does both.) Everything it writes is inside its temp dir.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message as WsMessage;
use codemantle_protocol::codec::{self, Codec};
use codemantle_protocol::handshake::{Credential, H1Fields, Verifier, h2_mac};
use codemantle_protocol::message::{DirList, HelloAck, Message};
use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::{FutureExt as _, StreamExt as _};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A test CA and a 127.0.0.1 server certificate signed by it.
fn tls_acceptor() -> (String, futures_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    (
        ca.pem(),
        futures_rustls::TlsAcceptor::from(Arc::new(server)),
    )
}

const SECRET: &str = "bench-device-key-0123456789";
const DEVICE: &str = "bench-device-0001";

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let bin = args
        .next()
        .unwrap_or_else(|| "target/release/codemantle-daemon".to_owned());
    let idle_s: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let tls = args.next().as_deref() == Some("wss");
    let size = std::fs::metadata(&bin)
        .unwrap_or_else(|e| {
            panic!("{bin}: {e} (build it with cargo build --release -p codemantle-daemon)")
        })
        .len();

    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    std::fs::create_dir(d.join("root")).unwrap();
    for i in 0..50 {
        std::fs::write(d.join(format!("root/file-{i:03}.txt")), b"x").unwrap();
    }
    let key = d.join("device.key");
    std::fs::write(&key, SECRET).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let acceptor = tls.then(|| {
        let (ca_pem, acceptor) = tls_acceptor();
        let mut bundle =
            std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
        bundle.push_str(&ca_pem);
        std::fs::write(d.join("bundle.pem"), bundle).unwrap();
        acceptor
    });
    let scheme = if tls { "wss" } else { "ws" };

    smol::block_on(async {
        let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = format!(
            "data_dir = \"{}\"\n[server]\nurl = \"{scheme}://127.0.0.1:{port}/ws\"\n[device]\nid = \"{DEVICE}\"\nkey_file = \"{}\"\n[roots]\ncwd = \"{}\"\n",
            d.join("data").display(),
            key.display(),
            d.join("root").display()
        );
        std::fs::write(d.join("daemon.toml"), config).unwrap();
        let mut child = std::process::Command::new(&bin)
            .arg("--config")
            .arg(d.join("daemon.toml"))
            .env_clear()
            .env("RUST_LOG", "warn")
            .env("SSL_CERT_FILE", d.join("bundle.pem"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(d.join("daemon.log")).unwrap())
            .spawn()
            .expect("start the daemon");
        let pid = child.id();

        let (tcp, _) = listener
            .accept()
            .or(async {
                smol::Timer::after(Duration::from_secs(10)).await;
                panic!("the daemon did not connect");
            })
            .await
            .unwrap();
        let io: Box<dyn Io> = match &acceptor {
            Some(acceptor) => Box::new(acceptor.accept(tcp).await.expect("TLS accept")),
            None => Box::new(tcp),
        };
        let mut ws = async_tungstenite::accept_async(io).await.unwrap();
        let Some(Ok(WsMessage::Binary(h1))) = ws.next().await else {
            panic!("expected a binary h1")
        };
        let Ok(Message::Hello(h1)) = codec::decode(&h1, Codec::Cbor) else {
            panic!("h1 does not decode")
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let lookup = |_: &str| {
            Some(Credential::Device {
                device_id: DEVICE.to_owned(),
                secret: SECRET.into(),
            })
        };
        Verifier::default()
            .verify(
                &H1Fields {
                    version: 1,
                    device_id: &h1.device_id,
                    key_id: h1.key_id.as_deref(),
                    token: None,
                    nonce: &h1.nonce,
                    ts_ms: h1.timestamp_ms,
                    mac: &h1.mac,
                },
                now_ms,
                &lookup,
            )
            .expect("h1 verifies");
        let (sid, srv) = ("BenchSession0001", "BenchServerNonce01");
        let h2 = Message::HelloAck(HelloAck {
            connection_id: sid.to_owned(),
            nonce: srv.to_owned(),
            heartbeat_secs: 5,
            max_chunk: 8192,
            mac: h2_mac(SECRET.as_bytes(), sid, srv, 5, 8192, &h1.nonce),
        });
        ws.send(WsMessage::binary(codec::encode(&h2, Codec::Cbor).unwrap()))
            .await
            .unwrap();

        // Idle: keep reading (telemetry, pings) and sample once a second.
        let mut samples = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(idle_s) {
            let tick = async {
                smol::Timer::after(Duration::from_secs(1)).await;
                None
            };
            let frame = async { Some(ws.next().await) };
            if let Some(None | Some(Err(_))) = frame.or(tick).await {
                panic!("the daemon dropped the link");
            }
            if start.elapsed().as_secs() as usize > samples.len() {
                samples.push(status_field(pid, "VmRSS:").unwrap_or(0));
            }
        }
        let idle_last = status_field(pid, "VmRSS:").unwrap_or(0);
        let idle_max = samples.iter().copied().max().unwrap_or(idle_last);

        // Some work: 200 listings of a 50-entry directory, then idle for 2 s.
        for i in 0..200u32 {
            let dr = Message::DirList(DirList {
                request_id: i + 1,
                root: "cwd".to_owned(),
                path: String::new(),
                limit: 256,
                cursor: None,
            });
            ws.send(WsMessage::binary(codec::encode(&dr, Codec::Cbor).unwrap()))
                .await
                .unwrap();
        }
        let mut replies = 0;
        while replies < 200 {
            match ws.next().await {
                Some(Ok(WsMessage::Binary(b))) => {
                    if let Ok(Message::DirListing(_)) = codec::decode(&b, Codec::Cbor) {
                        replies += 1;
                    }
                }
                Some(Ok(_)) => {}
                _ => panic!("the daemon dropped the link"),
            }
        }
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(2) {
            let _ = async { ws.next().await.map(drop) }
                .or(async {
                    smol::Timer::after(Duration::from_millis(200)).await;
                    None
                })
                .await;
        }
        let busy = status_field(pid, "VmRSS:").unwrap_or(0);
        let hwm = status_field(pid, "VmHWM:").unwrap_or(0);
        let threads = status_field(pid, "Threads:").unwrap_or(0);

        // Orderly stop.
        let raw_pid = i32::try_from(pid).expect("pid fits i32");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw_pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let stop = Instant::now();
        while let Some(Ok(_)) = ws.next().await {}
        let status = child.wait().unwrap();
        let stop_ms = stop.elapsed().as_millis();

        let mib = |kb: u64| kb as f64 / 1024.0;
        println!("binary: {bin} ({scheme}://)");
        println!(
            "binary size: {size} bytes ({:.2} MiB)",
            size as f64 / 1048576.0
        );
        println!(
            "idle RSS over {idle_s} s connected (hb 5 s): last {idle_last} kB ({:.2} MiB), max {idle_max} kB ({:.2} MiB); samples kB: {samples:?}",
            mib(idle_last),
            mib(idle_max)
        );
        println!(
            "after 200 dr (50 entries each) + 2 s: RSS {busy} kB ({:.2} MiB), peak (VmHWM) {hwm} kB ({:.2} MiB), threads {threads}",
            mib(busy),
            mib(hwm)
        );
        println!("SIGTERM: {status}, link closed after {stop_ms} ms");
        assert!(status.success(), "the daemon must exit 0 on SIGTERM");
    });
}
