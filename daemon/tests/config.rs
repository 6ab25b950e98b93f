//! Loading and checking the daemon configuration from real files, and `--check-config`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use codemantle_daemon::config::{self, Layer, LogFormat, Problem, Source};

struct Setup {
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("project")).unwrap();
        std::fs::create_dir(tmp.path().join("other")).unwrap();
        let key = tmp.path().join("device.key");
        std::fs::write(&key, "s3cret-device-key\n").unwrap();
        chmod(&key, 0o600);
        Setup { tmp }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn good_toml(&self) -> String {
        format!(
            r#"
data_dir = "{data}"
handshake_timeout_s = 15

[server]
url = "wss://cp.example.com/ws"

[device]
id = "build-box-0001"
key_file = "{key}"

[roots]
cwd = "{project}"
other = "{other}"

[reconnect]
base_ms = 500
cap_ms = 20000
stable_after_s = 90

[idempotency]
retention_s = 7200

[log]
format = "json"
"#,
            data = self.path("data").display(),
            key = self.path("device.key").display(),
            project = self.path("project").display(),
            other = self.path("other").display(),
        )
    }

    fn write_config(&self, text: &str) -> PathBuf {
        let p = self.path("daemon.toml");
        std::fs::write(&p, text).unwrap();
        chmod(&p, 0o644);
        p
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn problems(r: Result<config::Loaded, config::ConfigErrors>) -> Vec<Problem> {
    match r {
        Ok(l) => panic!("expected problems, got {:?}", l.config),
        Err(e) => e.problems,
    }
}

fn find<'a>(ps: &'a [Problem], key: &str) -> &'a Problem {
    ps.iter()
        .find(|p| p.key == key)
        .unwrap_or_else(|| panic!("no problem for {key} in {ps:#?}"))
}

#[test]
fn good_file_parses() {
    let s = Setup::new();
    let path = s.write_config(&s.good_toml());
    let loaded = config::load(&path, true, no_env(), Layer::default()).unwrap();
    let c = loaded.config;
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(c.server.url.raw, "wss://cp.example.com/ws");
    assert!(c.server.url.tls);
    assert_eq!(c.server.url.port, 443);
    assert_eq!(c.device.id, "build-box-0001");
    assert_eq!(c.device.key_file, s.path("device.key"));
    assert_eq!(c.data_dir, s.path("data"));
    assert_eq!(c.roots["cwd"], s.path("project"));
    assert_eq!(c.roots["other"], s.path("other"));
    assert_eq!(
        (
            c.reconnect.base_ms,
            c.reconnect.cap_ms,
            c.reconnect.stable_after_s
        ),
        (500, 20000, 90)
    );
    assert_eq!(c.handshake_timeout_s, 15);
    assert_eq!(c.idempotency.retention_s, 7200);
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.level, "info");

    let key = config::read_device_key(&c.device.key_file).unwrap();
    assert_eq!(key.expose(), "s3cret-device-key");
    assert!(!format!("{c:?} {key:?}").contains("s3cret"));
}

#[test]
fn defaults_apply() {
    let s = Setup::new();
    let path = s.write_config(&format!(
        "[server]\nurl = \"wss://cp/ws\"\n[device]\nid = \"build-box-0001\"\nkey_file = \"{}\"\n[roots]\ncwd = \"{}\"\n",
        s.path("device.key").display(),
        s.path("project").display(),
    ));
    let c = config::load(&path, true, no_env(), Layer::default())
        .unwrap()
        .config;
    assert_eq!(c.data_dir, Path::new(config::DEFAULT_DATA_DIR));
    assert_eq!(
        (
            c.reconnect.base_ms,
            c.reconnect.cap_ms,
            c.reconnect.stable_after_s
        ),
        (1000, 30000, 60)
    );
    assert_eq!(c.handshake_timeout_s, 10);
    assert_eq!(c.idempotency.retention_s, 86400);
    assert_eq!(c.log.format, LogFormat::Text);
}

#[test]
fn top_level_key_after_roots_is_flagged() {
    let s = Setup::new();
    // The TOML trap: `data_dir` written after [roots] is a root alias, not the setting.
    let path = s.write_config(&format!(
        "[server]\nurl = \"wss://cp/ws\"\n[device]\nid = \"build-box-0001\"\nkey_file = \"{}\"\n[roots]\ncwd = \"{}\"\ndata_dir = \"{}\"\n",
        s.path("device.key").display(),
        s.path("project").display(),
        s.path("other").display(),
    ));
    let loaded = config::load(&path, true, no_env(), Layer::default()).unwrap();
    assert_eq!(loaded.config.data_dir, Path::new(config::DEFAULT_DATA_DIR));
    let w = find(&loaded.warnings, "roots.data_dir");
    assert!(w.fix.contains("above the first [section]"), "{w}");
}

#[test]
fn trust_files_inside_a_root_are_refused() {
    let s = Setup::new();
    let key_in_root = s.path("project/device.key");
    std::fs::copy(s.path("device.key"), &key_in_root).unwrap();
    chmod(&key_in_root, 0o600);
    let path = s.write_config(&s.good_toml());
    let e = env(&[
        ("CODEMANTLE_KEY_FILE", key_in_root.to_str().unwrap()),
        (
            "CODEMANTLE_DATA_DIR",
            s.path("project/.state/data").to_str().unwrap(),
        ),
    ]);
    let ps = problems(config::load(&path, true, e, Layer::default()));
    assert!(
        find(&ps, "device.key_file").what.contains("inside"),
        "{ps:#?}"
    );
    assert!(find(&ps, "data_dir").what.contains("root `cwd`"), "{ps:#?}");

    // A root that *contains* the config file (here: a root at the temp dir itself).
    let e = env(&[("CODEMANTLE_ROOT_ALL", s.tmp.path().to_str().unwrap())]);
    let ps = problems(config::load(&path, true, e, Layer::default()));
    let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["device.key_file", "data_dir", "config file"],
        "{ps:#?}"
    );
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    let s = Setup::new();
    let path = s.write_config(&s.good_toml());
    let e = env(&[
        ("CODEMANTLE_SERVER_URL", "wss://from-env.example/ws"),
        ("CODEMANTLE_DEVICE_ID", "env-device-0001"),
        ("CODEMANTLE_RECONNECT_CAP_MS", "45000"),
        ("CODEMANTLE_ROOT_EXTRA", s.path("other").to_str().unwrap()),
        ("CODEMANTLE_SOMETHING_ELSE", "x"),
    ]);
    let mut flags = Layer::default();
    flags.set(
        "device.id",
        "flag-device-0001",
        Source::Flag("--device-id".into()),
    );
    let loaded = config::load(&path, true, e, flags).unwrap();
    let c = loaded.config;
    assert_eq!(c.server.url.raw, "wss://from-env.example/ws");
    assert_eq!(c.device.id, "flag-device-0001");
    assert_eq!(c.reconnect.cap_ms, 45000);
    assert_eq!(c.reconnect.base_ms, 500, "file value kept");
    assert_eq!(c.roots["extra"], s.path("other"));
    assert_eq!(loaded.warnings.len(), 1);
    assert_eq!(loaded.warnings[0].key, "CODEMANTLE_SOMETHING_ELSE");
}

#[test]
fn env_and_flags_alone_suffice_without_a_file() {
    let s = Setup::new();
    let e = env(&[
        ("CODEMANTLE_SERVER_URL", "ws://127.0.0.1:8787"),
        ("CODEMANTLE_DEVICE_ID", "env-device-0001"),
        (
            "CODEMANTLE_KEY_FILE",
            s.path("device.key").to_str().unwrap(),
        ),
        ("CODEMANTLE_DATA_DIR", s.path("data").to_str().unwrap()),
        ("CODEMANTLE_ROOT_CWD", s.path("project").to_str().unwrap()),
    ]);
    let c = config::load(&s.path("absent.toml"), false, e, Layer::default())
        .unwrap()
        .config;
    assert!(!c.server.url.tls);
    assert_eq!(c.server.url.port, 8787);
    // But a required (explicit) file must exist.
    let ps = problems(config::load(
        &s.path("absent.toml"),
        true,
        no_env(),
        Layer::default(),
    ));
    assert!(find(&ps, "config file").what.contains("absent.toml"));
}

#[test]
fn bad_env_number_names_key_and_variable() {
    let s = Setup::new();
    let path = s.write_config(&s.good_toml());
    let ps = problems(config::load(
        &path,
        true,
        env(&[("CODEMANTLE_RECONNECT_BASE_MS", "abc")]),
        Layer::default(),
    ));
    let p = find(&ps, "reconnect.base_ms");
    assert!(p.what.contains("CODEMANTLE_RECONNECT_BASE_MS"), "{p}");
}

#[test]
fn unknown_keys_are_named() {
    let s = Setup::new();
    let text = s
        .good_toml()
        .replace("[server]\n", "[server]\nulr = \"typo\"\n")
        + "\n[extras]\nfoo = 1\n";
    let path = s.write_config(&format!("colour = \"blue\"\n{text}"));
    let ps = problems(config::load(&path, true, no_env(), Layer::default()));
    let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["colour", "extras", "server.ulr"], "{ps:#?}");
    let p = find(&ps, "server.ulr");
    assert_eq!(p.what, "unknown key");
    assert!(p.fix.contains("server.url"), "{p}");
    assert!(
        p.to_string().starts_with("server.ulr: unknown key — "),
        "{p}"
    );
}

#[test]
fn world_writable_config_file_is_refused() {
    let s = Setup::new();
    let path = s.write_config(&s.good_toml());
    chmod(&path, 0o666);
    let ps = problems(config::load(&path, true, no_env(), Layer::default()));
    let p = find(&ps, "config file");
    assert!(p.what.contains("world-writable"), "{p}");
    assert!(p.fix.contains("chmod o-w"), "{p}");
}

#[test]
fn bad_url_scheme_names_server_url_and_the_fix() {
    let s = Setup::new();
    let path = s.write_config(
        &s.good_toml()
            .replace("wss://cp.example.com/ws", "https://cp.example.com/ws"),
    );
    let ps = problems(config::load(&path, true, no_env(), Layer::default()));
    let p = find(&ps, "server.url");
    assert!(p.what.contains("https"), "{p}");
    assert!(p.fix.contains("wss://"), "{p}");
    let line = p.to_string();
    assert!(
        line.starts_with("server.url: ") && line.contains(" — use wss://"),
        "{line}"
    );

    // Credentials in the URL are refused, and not echoed.
    let path = s.write_config(
        &s.good_toml()
            .replace("wss://cp.example.com/ws", "wss://u:pw@cp/ws?token=abc"),
    );
    let ps = problems(config::load(&path, true, no_env(), Layer::default()));
    let p = find(&ps, "server.url");
    assert!(p.what.contains("credentials"), "{p}");
    assert!(!p.what.contains("token=abc"), "{p}");
}

#[test]
fn plain_ws_to_remote_host_is_a_warning() {
    let s = Setup::new();
    let path = s.write_config(
        &s.good_toml()
            .replace("wss://cp.example.com/ws", "ws://cp.example.com/ws"),
    );
    let loaded = config::load(&path, true, no_env(), Layer::default()).unwrap();
    assert_eq!(loaded.warnings[0].key, "server.url");
}

#[test]
fn key_file_must_be_private_and_ours() {
    let s = Setup::new();
    let path = s.write_config(&s.good_toml());
    let key = s.path("device.key");

    chmod(&key, 0o644);
    let ps = problems(config::load(&path, true, no_env(), Layer::default()));
    let p = find(&ps, "device.key_file");
    assert!(
        p.what.contains("0644") && p.fix.contains("chmod 600"),
        "{p}"
    );
    assert!(config::read_device_key(&key).is_err());

    chmod(&key, 0o400);
    config::load(&path, true, no_env(), Layer::default()).unwrap();

    // A symlink is refused, so the checked file is the file read.
    let link = s.path("key-link");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    let ps = problems(config::load(
        &path,
        true,
        env(&[("CODEMANTLE_KEY_FILE", link.to_str().unwrap())]),
        Layer::default(),
    ));
    assert!(find(&ps, "device.key_file").what.contains("symlink"));
    assert!(config::read_device_key(&link).is_err());

    // Owned by someone else (only testable as root).
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(&key, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
        let ps = problems(config::load(&path, true, no_env(), Layer::default()));
        let p = find(&ps, "device.key_file");
        assert!(
            p.what.contains("uid 4242") && p.fix.contains("chown"),
            "{p}"
        );
    }
}

#[test]
fn world_writable_data_dir_and_ancestor_are_refused() {
    let s = Setup::new();
    let path = s.write_config(&s.good_toml());
    std::fs::create_dir(s.path("data")).unwrap();
    chmod(&s.path("data"), 0o777);
    let ps = problems(config::load(&path, true, no_env(), Layer::default()));
    let p = find(&ps, "data_dir");
    assert!(p.what.contains("world-writable"), "{p}");
    chmod(&s.path("data"), 0o700);
    config::load(&path, true, no_env(), Layer::default()).unwrap();

    // A world-writable, non-sticky ancestor.
    let open = s.path("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let e = env(&[("CODEMANTLE_DATA_DIR", open.join("data").to_str().unwrap())]);
    let ps = problems(config::load(&path, true, e.clone(), Layer::default()));
    let p = find(&ps, "data_dir");
    assert!(
        p.what.contains("ancestor") && p.what.contains("not sticky"),
        "{p}"
    );
    // Sticky (like /tmp) is fine.
    chmod(&open, 0o1777);
    config::load(&path, true, e, Layer::default()).unwrap();
}

#[test]
fn every_missing_requirement_is_reported_at_once() {
    let s = Setup::new();
    let path = s.write_config("[log]\nformat = \"xml\"\n");
    let ps = problems(config::load(&path, true, no_env(), Layer::default()));
    let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "server.url",
        "device.id",
        "device.key_file",
        "roots.cwd",
        "log.format",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    assert!(
        find(&ps, "server.url")
            .fix
            .contains("CODEMANTLE_SERVER_URL")
    );
}

fn daemon() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_codemantle-daemon"));
    c.env_clear();
    c
}

#[test]
fn check_config_flag() {
    let s = Setup::new();
    let path = s.write_config(&s.good_toml());
    let out = daemon()
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "config OK");

    // Flags win: a bad --server-url and --root are reported as key: what — fix lines.
    let out = daemon()
        .arg("--config")
        .arg(&path)
        .args([
            "--check-config",
            "--server-url",
            "http://x",
            "--root",
            "bad/alias=/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines.iter().any(|l| l.starts_with("server.url: ")
            && l.contains("(from --server-url)")
            && l.contains(" — ")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("roots.bad/alias: ")),
        "{stdout}"
    );
}

#[test]
fn run_opens_everything_dials_and_stops_on_sigterm() {
    let s = Setup::new();
    let path = s.write_config(&s.good_toml());
    // A loopback port nobody listens on: the daemon dials, is refused, and keeps retrying.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = s.path("daemon.log");
    let mut child = daemon()
        .arg("--config")
        .arg(&path)
        .arg("--server-url")
        .arg(format!("ws://127.0.0.1:{closed_port}/ws"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("reconnecting in")
    {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon never dialled");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The journal was opened (and created private) on the way.
    assert!(s.path("data/journal").exists());

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn config_push_and_git_sections() {
    use codemantle_protocol::message::PolicyMode;
    let s = Setup::new();
    let text = format!(
        "{}\n[config_push]\nallowed_apply_paths = [\".opencode/opencode.json\", \"app/opencode.json\"]\n\
         require_signature = true\npolicy_floor = \"read-only\"\nrestricted_tools = [\"read\", \"grep\"]\n\
         [git]\ntimeout_s = 60\nallow_ssh = false\n",
        s.good_toml()
    );
    let path = s.write_config(&text);
    let loaded = config::load(&path, true, no_env(), Layer::default()).unwrap();
    let c = loaded.config;
    assert_eq!(
        c.config_push.allowed_apply_paths,
        [".opencode/opencode.json", "app/opencode.json"]
    );
    assert!(c.config_push.require_signature);
    assert_eq!(c.config_push.policy_floor, PolicyMode::ReadOnly);
    assert_eq!(c.config_push.restricted_tools, ["read", "grep"]);
    assert_eq!(
        (c.git.timeout_s, c.git.allow_http, c.git.allow_ssh),
        (60, true, false)
    );
    // git.* without git on the allowlist cannot take effect: the operator is told.
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.key.contains("git.timeout_s") && w.fix.contains("[process.allowlist]")),
        "{:?}",
        loaded.warnings
    );

    // Env overrides, booleans as text.
    let loaded = config::load(
        &path,
        true,
        env(&[
            ("CODEMANTLE_CONFIG_PUSH_REQUIRE_SIGNATURE", "false"),
            ("CODEMANTLE_GIT_ALLOW_HTTP", "no"),
            ("CODEMANTLE_CONFIG_PUSH_POLICY_FLOOR", "restricted"),
        ]),
        Layer::default(),
    )
    .unwrap();
    assert!(!loaded.config.config_push.require_signature);
    assert!(!loaded.config.git.allow_http);
    assert_eq!(
        loaded.config.config_push.policy_floor,
        PolicyMode::Restricted
    );
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.key == "config_push.require_signature"),
        "unsigned pushes accepted is a warning: {:?}",
        loaded.warnings
    );
}

#[test]
fn config_push_and_git_defaults() {
    let s = Setup::new();
    let path = s.write_config(&s.good_toml());
    let c = config::load(&path, true, no_env(), Layer::default())
        .unwrap()
        .config;
    assert_eq!(
        c.config_push,
        codemantle_daemon::config_apply::ApplySettings::default()
    );
    assert_eq!(c.git, config::GitSettings::default());
    assert!(
        c.config_push.require_signature,
        "signatures are required by default"
    );
}

#[test]
fn bad_config_push_and_git_settings_are_each_named() {
    let s = Setup::new();
    let text = format!(
        "{}\n[config_push]\nallowed_apply_paths = [\"../etc/x.json\", \"notes.txt\"]\n\
         require_signature = \"yes\"\npolicy_floor = \"strict\"\nrestricted_keys = [\"has space\"]\n\
         bogus = 1\n[git]\ntimeout_s = 0\nallow_ssh = 1\n",
        s.good_toml()
    );
    let path = s.write_config(&text);
    let ps = problems(config::load(&path, true, no_env(), Layer::default()));
    let paths: Vec<&Problem> = ps
        .iter()
        .filter(|p| p.key == "config_push.allowed_apply_paths")
        .collect();
    assert_eq!(paths.len(), 2, "{ps:#?}");
    assert!(
        find(&ps, "config_push.require_signature")
            .what
            .contains("not true or false")
    );
    assert!(
        find(&ps, "config_push.policy_floor")
            .fix
            .contains("read-only")
    );
    find(&ps, "config_push.restricted_keys");
    assert!(
        find(&ps, "config_push.bogus")
            .fix
            .contains("config_push.require_signature")
    );
    find(&ps, "git.timeout_s");
    assert!(
        find(&ps, "git.allow_ssh")
            .what
            .contains("not true or false")
    );
}
