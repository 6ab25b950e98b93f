//! The sled store against a real data dir: round-trips, reopen, atomic events, isolation.

use std::collections::BTreeMap;

use codemantle_control_plane::events::{CommandRecord, EventDraft, kind};
use codemantle_control_plane::secrets;
use codemantle_control_plane::store::sled::SledStore;
use codemantle_control_plane::store::*;
use serde_json::json;

fn tenant(id: &str) -> TenantId {
    TenantId::parse(id).expect("valid tenant id")
}

fn new_tenant(store: &SledStore, id: &str) {
    let t = Tenant {
        id: tenant(id),
        name: id.to_uppercase(),
        created_ms: 1,
    };
    store
        .create_tenant(&t, "local-admin")
        .expect("create tenant");
}

fn device(id: &str, t: &str) -> Device {
    let secret = secrets::random_secret();
    Device {
        id: id.into(),
        tenant: tenant(t),
        name: format!("{id} box"),
        labels: BTreeMap::from([("rack".into(), "r1".into())]),
        key_id: secrets::key_id(&secret),
        secret,
        created_ms: 5,
        first_seen_ms: None,
        last_seen_ms: None,
        agent_version: None,
        host: HostFacts::default(),
    }
}

fn token(t: &str, role: Role) -> (ApiToken, String) {
    let minted = secrets::mint_api_token();
    let tok = ApiToken {
        id: minted.id,
        tenant: tenant(t),
        role,
        name: "ci".into(),
        created_ms: 7,
        created_by: "local-admin".into(),
        revoked: false,
        revoked_ms: None,
        secret_sha256: minted.secret_sha256,
    };
    (tok, minted.bearer)
}

fn template(t: &str, id: &str, version: &str) -> TemplateVersion {
    TemplateVersion {
        tenant: tenant(t),
        template_id: id.into(),
        version: version.into(),
        body: json!({ "templateVersion": version }),
        digest: None,
        published_ms: 9,
        published_by: "token:x".into(),
    }
}

#[test]
fn entities_round_trip_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = device("dev_roundtrip_0001", "default");
    let (tok, _) = token("default", Role::Admin);
    {
        let store = SledStore::open(dir.path()).expect("open");
        new_tenant(&store, "default");
        store.create_device(&d, "local-admin").expect("device");
        store.create_api_token(&tok, "local-admin").expect("token");
        for v in ["1.9.0", "1.10.0", "1.10.0-rc.1"] {
            store
                .publish_template(&template("default", "py-build", v), "token:x")
                .expect("publish");
        }
        store
            .put_policy(
                &tenant("default"),
                &json!({"mode":"restricted"}),
                "token:x",
                11,
            )
            .expect("policy");
        let session = SessionRecord {
            session_id: "s1".into(),
            device_id: d.id.clone(),
            tenant: tenant("default"),
            folder: "/srv/p".into(),
            state: "running".into(),
            created_ms: 12,
            updated_ms: 12,
        };
        store.put_session(&session, "token:x").expect("session");
        let mcp = McpEntry {
            tenant: tenant("default"),
            server_id: "docs".into(),
            version: "1.0.0".into(),
            body: json!({"type":"remote"}),
            updated_ms: 13,
        };
        store.put_mcp_entry(&mcp, "token:x").expect("mcp");
        store.flush().expect("flush");
    }
    let store = SledStore::open(dir.path()).expect("reopen");
    let t = tenant("default");
    assert_eq!(store.device(&t, &d.id).expect("read"), Some(d.clone()));
    assert_eq!(store.devices(&t).expect("list"), vec![d.clone()]);
    assert_eq!(store.api_token(&tok.id).expect("read"), Some(tok.clone()));
    assert_eq!(store.api_tokens(&t).expect("list"), vec![tok]);
    let latest = store
        .latest_template(&t, "py-build")
        .expect("latest")
        .expect("some");
    assert_eq!(latest.version, "1.10.0", "semver, not string order");
    let versions: Vec<String> = store
        .template_versions(&t, "py-build")
        .expect("versions")
        .into_iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, ["1.9.0", "1.10.0-rc.1", "1.10.0"]);
    assert_eq!(
        store.policy(&t).expect("policy").map(|p| p.body),
        Some(json!({"mode":"restricted"}))
    );
    assert_eq!(
        store.session(&t, "s1").expect("session").map(|s| s.state),
        Some("running".into())
    );
    assert_eq!(store.sessions(&t, Some(&d.id)).expect("sessions").len(), 1);
    assert_eq!(store.mcp_entries(&t).expect("mcp").len(), 1);
    let cred = store.device_credential(&d.id).expect("cred").expect("some");
    assert_eq!((cred.key_id, cred.secret), (d.key_id, d.secret));
    // tenant, device, token, 3 templates, policy, session, mcp
    assert_eq!(store.last_event_seq().expect("seq"), 9);
}

#[test]
fn published_template_versions_are_immutable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    new_tenant(&store, "default");
    store
        .publish_template(&template("default", "py-build", "1.0.0"), "a")
        .expect("first");
    let mut again = template("default", "py-build", "1.0.0");
    again.body = json!({"changed": true});
    assert!(matches!(
        store.publish_template(&again, "a"),
        Err(StoreError::AlreadyExists { .. })
    ));
    let kept = store
        .template_version(&tenant("default"), "py-build", "1.0.0")
        .expect("read");
    assert_eq!(
        kept.map(|t| t.body),
        Some(json!({ "templateVersion": "1.0.0" }))
    );
}

#[test]
fn a_change_appends_exactly_one_event_with_the_next_seq_and_a_failed_change_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    new_tenant(&store, "default");
    let before = store.last_event_seq().expect("seq");
    let live = store.subscribe(Some(tenant("default")));

    let d = device("dev_atomic_00001", "default");
    let ev = store.create_device(&d, "token:abc").expect("add");
    assert_eq!(ev.seq, before + 1);
    assert_eq!(ev.kind, kind::DEVICE_ADDED);
    assert_eq!(ev.actor, "token:abc");
    assert_eq!(ev.detail["device"], json!(d.id));
    assert_eq!(live.try_recv().ok(), Some(ev.clone()));

    // Duplicate id: nothing written, no event, no seq consumed.
    assert!(matches!(
        store.create_device(&d, "token:abc"),
        Err(StoreError::AlreadyExists { .. })
    ));
    // Unknown tenant: same.
    assert!(matches!(
        store.create_device(&device("dev_atomic_00002", "nope"), "x"),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.last_event_seq().expect("seq"), before + 1);
    let events = store
        .events(&tenant("default"), before, 100)
        .expect("events");
    assert_eq!(events, vec![ev]);
    assert!(live.try_recv().is_err());

    let removed = store
        .remove_device(&tenant("default"), &d.id, "token:abc")
        .expect("remove");
    assert_eq!(
        (removed.seq, removed.kind.as_str()),
        (before + 2, kind::DEVICE_REMOVED)
    );
    assert!(store.device_credential(&d.id).expect("cred").is_none());
}

#[test]
fn tenant_scoped_accessors_hide_other_tenants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    new_tenant(&store, "a");
    new_tenant(&store, "b");
    let d = device("dev_of_tenant_b1", "b");
    store.create_device(&d, "x").expect("add");
    let (tok, _) = token("b", Role::Viewer);
    store.create_api_token(&tok, "x").expect("token");
    store
        .publish_template(&template("b", "tpl", "1.0.0"), "x")
        .expect("tpl");
    let a = tenant("a");
    assert_eq!(store.device(&a, &d.id).expect("read"), None);
    assert!(store.devices(&a).expect("list").is_empty());
    assert!(matches!(
        store.remove_device(&a, &d.id, "x"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.revoke_api_token(&a, &tok.id, "x", 1),
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.api_tokens(&a).expect("list").is_empty());
    assert_eq!(store.latest_template(&a, "tpl").expect("tpl"), None);
    assert!(
        store
            .events(&a, 0, 100)
            .expect("events")
            .iter()
            .all(|e| e.tenant == a)
    );
    assert!(store.device(&tenant("b"), &d.id).expect("read").is_some());
}

#[test]
fn events_resume_after_restart_without_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = tenant("default");
    let first_batch;
    {
        let store = SledStore::open(dir.path()).expect("open");
        new_tenant(&store, "default");
        for i in 0..5 {
            store
                .create_device(&device(&format!("dev_resume_{i:05}"), "default"), "x")
                .expect("add");
        }
        first_batch = store.events(&t, 0, 1000).expect("events");
    }
    let resume_from = first_batch[2].seq;
    let store = SledStore::open(dir.path()).expect("reopen");
    let rec = CommandRecord {
        tenant: t.clone(),
        actor: "token:x".into(),
        device_id: "dev_resume_00000".into(),
        request_id: "r1".into(),
        command_type: "dr".into(),
        outcome: "ok".into(),
        duration: std::time::Duration::from_millis(12),
        at_ms: 100,
    };
    let metrics = codemantle_control_plane::metrics::Metrics::new();
    let cmd =
        codemantle_control_plane::events::record_command(&store, &metrics, &rec).expect("append");
    // A command record is served once durable.
    store
        .when_durable(cmd.seq)
        .wait_blocking()
        .expect("durable");
    let text = metrics.render(Default::default());
    assert!(text.contains("codemantle_commands_total{type=\"dr\",outcome=\"ok\"} 1"));
    assert_eq!(cmd.detail["duration_ms"], json!(12));
    let resumed = store.events(&t, resume_from, 1000).expect("events");
    let seqs: Vec<u64> = resumed.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (resume_from + 1..=cmd.seq).collect();
    assert_eq!(seqs, expected, "no gap, no duplicate across the restart");
    assert_eq!(&resumed[..resumed.len() - 1], &first_batch[3..]);
    // Paging.
    let page = store.events(&t, 0, 2).expect("page");
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    let tail = store.recent_events(&t, 2).expect("tail");
    assert_eq!(
        tail.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [cmd.seq - 1, cmd.seq]
    );
}

#[test]
fn connect_and_disconnect_update_the_device_with_their_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    new_tenant(&store, "default");
    let d = device("dev_connects_001", "default");
    store.create_device(&d, "x").expect("add");
    let info = ConnectInfo {
        at_ms: 1000,
        agent_version: Some("0.2.0".into()),
        host: HostFacts {
            hostname: Some("build-1".into()),
            os: Some("linux".into()),
            arch: Some("aarch64".into()),
        },
        peer: Some("10.0.0.9:4242".into()),
        mode: Some("native".into()),
    };
    let ev = store.device_connected(&d.id, &info).expect("connected");
    assert_eq!(ev.kind, kind::DEVICE_CONNECTED);
    store
        .device_disconnected(&d.id, 2000, "closed")
        .expect("disconnected");
    store
        .device_connected(
            &d.id,
            &ConnectInfo {
                at_ms: 3000,
                ..Default::default()
            },
        )
        .expect("again");
    let got = store
        .device(&tenant("default"), &d.id)
        .expect("read")
        .expect("some");
    assert_eq!(
        (got.first_seen_ms, got.last_seen_ms),
        (Some(1000), Some(3000))
    );
    assert_eq!(got.agent_version.as_deref(), Some("0.2.0"));
    assert_eq!(got.host.arch.as_deref(), Some("aarch64"));
    assert!(matches!(
        store.device_connected("dev_never_added", &info),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn idempotency_claims_replays_and_detects_reuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    let t = tenant("default");
    let claim = |fp: &str, now| {
        store
            .idempotency_claim(&t, "k1", fp, now, 1000)
            .expect("claim")
    };
    assert_eq!(claim("fp", 0), IdempotencyClaim::Claimed);
    assert_eq!(claim("fp", 1), IdempotencyClaim::InProgress);
    assert_eq!(claim("other", 1), IdempotencyClaim::Mismatch);
    let resp = StoredResponse {
        status: 201,
        body: json!({"ok": true}),
    };
    store
        .idempotency_complete(&t, "k1", &resp, 1000)
        .expect("complete");
    assert_eq!(claim("fp", 2), IdempotencyClaim::Replay(resp));
    // The lease of an unfinished claim runs out, so a crash does not block the key.
    let lease = |now| {
        store
            .idempotency_claim(&t, "k2", "fp", now, 10)
            .expect("claim")
    };
    assert_eq!(lease(0), IdempotencyClaim::Claimed);
    assert_eq!(lease(5), IdempotencyClaim::InProgress);
    assert_eq!(lease(11), IdempotencyClaim::Claimed);
    // Another tenant's identical key is independent.
    assert_eq!(
        store
            .idempotency_claim(&tenant("other"), "k1", "fp", 2, 1000)
            .expect("claim"),
        IdempotencyClaim::Claimed
    );
    // Expired: claimable again; purge removes expired records.
    assert_eq!(claim("fp", 5000), IdempotencyClaim::Claimed);
    assert_eq!(store.idempotency_purge(10_000).expect("purge"), 3);
    store.idempotency_release(&t, "k1").expect("release");
}

#[test]
fn revoking_twice_writes_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SledStore::open(dir.path()).expect("open");
    new_tenant(&store, "default");
    let (tok, _) = token("default", Role::Operator);
    store.create_api_token(&tok, "x").expect("token");
    let t = tenant("default");
    let (revoked, ev) = store
        .revoke_api_token(&t, &tok.id, "x", 50)
        .expect("revoke")
        .expect("first");
    assert!(revoked.revoked && ev.kind == kind::TOKEN_REVOKED);
    assert!(
        store
            .revoke_api_token(&t, &tok.id, "x", 60)
            .expect("revoke")
            .is_none()
    );
    assert_eq!(
        store
            .api_token(&tok.id)
            .expect("read")
            .and_then(|t| t.revoked_ms),
        Some(50)
    );
}

#[test]
fn the_data_dir_is_private_and_single_process() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let _store = SledStore::open(&data).expect("open");
    let mode = std::fs::metadata(&data).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    match SledStore::open(&data) {
        Ok(_) => panic!("a second open of a busy data dir must fail"),
        Err(e) => assert!(e.to_string().contains("in use by another process"), "{e}"),
    }
}

/// The durable watermark: an appended event is neither served nor published until a flush
/// covers it, and an entity change does not return before that flush (its record is visible
/// to plain reads at once, its event is not).
#[test]
fn events_are_served_and_published_only_once_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = std::sync::Arc::new(SledStore::open(dir.path()).expect("open"));
    new_tenant(&store, "default");
    let t = tenant("default");
    let live = store.subscribe(Some(t.clone()));
    let before = store.last_event_seq().expect("seq");

    let hold = store.hold_flushes();
    let ev = store
        .append_event(EventDraft::new(
            &t,
            1,
            "system",
            kind::COMMAND,
            json!({"n": 1}),
        ))
        .expect("append");
    assert_eq!(ev.seq, before + 1);
    // Written, not durable: not served, not published, not the watermark.
    assert_eq!(store.events(&t, before, 100).expect("events"), vec![]);
    assert!(
        store
            .recent_events(&t, 100)
            .expect("tail")
            .iter()
            .all(|e| e.seq <= before)
    );
    assert_eq!(store.last_event_seq().expect("seq"), before);
    assert!(live.try_recv().is_err());

    // An entity change commits, then waits for the held flush.
    let d = device("dev_durable_0001", "default");
    let adder = std::thread::spawn({
        let (store, d) = (store.clone(), d.clone());
        move || store.create_device(&d, "token:abc")
    });
    codemantle_tests::harness::wait_until(
        std::time::Duration::from_secs(10),
        "the device record committed",
        || store.device(&t, &d.id).expect("read").is_some(),
    );
    assert!(
        !adder.is_finished(),
        "create_device returned before its event was durable"
    );
    assert_eq!(store.events(&t, before, 100).expect("events"), vec![]);
    assert!(live.try_recv().is_err());

    drop(hold);
    let added = adder.join().expect("thread").expect("create_device");
    assert_eq!(added.seq, ev.seq + 1);
    // Now both are durable: served, published in order, and the watermark.
    store.when_durable(ev.seq).wait_blocking().expect("durable");
    assert_eq!(
        store.events(&t, before, 100).expect("events"),
        vec![ev.clone(), added.clone()]
    );
    assert_eq!(
        store.recent_events(&t, 2).expect("tail"),
        vec![ev.clone(), added.clone()]
    );
    assert_eq!(store.last_event_seq().expect("seq"), added.seq);
    assert_eq!(live.try_recv().ok(), Some(ev));
    assert_eq!(live.try_recv().ok(), Some(added));
}

/// After a restart, what was durable is served again and the next seq follows it.
#[test]
fn durable_events_are_there_after_reopen_and_seqs_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = tenant("default");
    let last = {
        let store = SledStore::open(dir.path()).expect("open");
        new_tenant(&store, "default");
        let mut last = 0;
        for n in 0..50 {
            last = store
                .append_event(EventDraft::new(
                    &t,
                    n,
                    "system",
                    kind::COMMAND,
                    json!({"n": n}),
                ))
                .expect("append")
                .seq;
        }
        store.when_durable(last).wait_blocking().expect("durable");
        last
    };
    let store = SledStore::open(dir.path()).expect("reopen");
    assert_eq!(store.last_event_seq().expect("seq"), last);
    let all = store.events(&t, 0, 1000).expect("events");
    assert_eq!(
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    let next = store
        .append_event(EventDraft::new(&t, 99, "system", kind::COMMAND, json!({})))
        .expect("append");
    assert_eq!(next.seq, last + 1);
}
