//! `[process]` in the daemon config: the allowlist and friends are checked at load time, with
//! every problem named. Files are created only inside the test's temp dir.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use codemantle_daemon::config::process::ProtectionLevel;
use codemantle_daemon::config::{self, Layer, Problem};

struct Setup {
    tmp: tempfile::TempDir,
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("project")).unwrap();
        std::fs::create_dir(tmp.path().join("bin")).unwrap();
        let key = tmp.path().join("device.key");
        std::fs::write(&key, "s3cret-device-key\n").unwrap();
        chmod(&key, 0o600);
        for (name, mode) in [("tool", 0o755), ("not-exec", 0o644), ("open", 0o757)] {
            let p = tmp.path().join("bin").join(name);
            std::fs::write(&p, b"#!/bin/true\n").unwrap();
            chmod(&p, mode);
        }
        let planted = tmp.path().join("project/tool");
        std::fs::write(&planted, b"#!/bin/true\n").unwrap();
        chmod(&planted, 0o755);
        Setup { tmp }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn load(&self, process: &str, env: &[(&str, &str)]) -> Result<config::Loaded, Vec<Problem>> {
        let text = format!(
            "data_dir = \"{data}\"\n[server]\nurl = \"wss://cp.example.com/ws\"\n[device]\nid = \"build-box-0001\"\nkey_file = \"{key}\"\n[roots]\ncwd = \"{project}\"\n{process}",
            data = self.path("data").display(),
            key = self.path("device.key").display(),
            project = self.path("project").display(),
        );
        let p = self.path("daemon.toml");
        std::fs::write(&p, text).unwrap();
        chmod(&p, 0o644);
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        config::load(&p, true, env, Layer::default()).map_err(|e| e.problems)
    }
}

fn find<'a>(ps: &'a [Problem], key: &str) -> &'a Problem {
    ps.iter()
        .find(|p| p.key == key)
        .unwrap_or_else(|| panic!("no problem for {key} in {ps:#?}"))
}

#[test]
fn no_process_section_means_nothing_allowed() {
    let s = Setup::new();
    let c = s.load("", &[]).unwrap().config.process;
    assert!(c.allowlist.is_empty());
    assert_eq!(c.min_protection, ProtectionLevel::Fs);
    assert_eq!(c.connect_ports, [443]);
}

#[test]
fn a_good_section_parses() {
    if !nix::unistd::geteuid().is_root() {
        return; // run_as needs a root daemon
    }
    let s = Setup::new();
    let text = format!(
        "[process]\nrun_as = \"nobody\"\nmin_protection = \"fs+net\"\nmax_open_files = 2048\nmax_cpu_seconds = 3600\nenv_pass = [\"LANG\", \"TERM\"]\nconnect_ports = [443, 22, 443]\nsystem_paths = [\"{bin}\"]\nprivate_dir = \"{private}\"\n[process.allowlist]\ntrue = \"/bin/true\"\ntool = {{ path = \"{tool}\", args = [\"serve\", \"--a,b\"] }}\n",
        bin = s.path("bin").display(),
        private = s.path("private").display(),
        tool = s.path("bin/tool").display(),
    );
    let loaded = s.load(&text, &[]).unwrap_or_else(|p| panic!("{p:#?}"));
    let c = loaded.config.process;
    assert_eq!(c.allowlist["true"].path, PathBuf::from("/bin/true"));
    assert!(c.allowlist["true"].args.is_empty());
    assert_eq!(c.allowlist["tool"].args, ["serve", "--a,b"]);
    assert_eq!(c.run_as.as_ref().unwrap().uid, 65534);
    assert_eq!(c.min_protection, ProtectionLevel::FsNet);
    assert_eq!(c.limits.max_open_files, 2048);
    assert_eq!(c.limits.max_cpu_seconds, Some(3600));
    assert_eq!(c.limits.max_address_space_mb, None);
    assert_eq!(c.env_pass, ["LANG", "TERM"]);
    assert_eq!(c.connect_ports, [22, 443]);
    assert_eq!(c.system_paths, [s.path("bin")]);
    assert_eq!(c.private_dir, s.path("private"));
}

#[test]
fn bad_allowlist_entries_are_refused_at_load() {
    let s = Setup::new();
    let text = format!(
        "[process]\nrun_as = \"nobody\"\n[process.allowlist]\nrelative = \"bin/tool\"\nmissing = \"{missing}\"\nnoexec = \"{noexec}\"\nopen = \"{open}\"\ndir = \"{dir}\"\nplanted = \"{planted}\"\nBad = \"/bin/true\"\nweird = {{ path = \"/bin/true\", argz = [] }}\n",
        missing = s.path("bin/missing").display(),
        noexec = s.path("bin/not-exec").display(),
        open = s.path("bin/open").display(),
        dir = s.path("bin").display(),
        planted = s.path("project/tool").display(),
    );
    let ps = s.load(&text, &[]).unwrap_err();
    assert!(
        find(&ps, "process.allowlist.relative")
            .what
            .contains("not an absolute path")
    );
    assert!(
        find(&ps, "process.allowlist.missing")
            .what
            .contains("No such file")
    );
    assert!(
        find(&ps, "process.allowlist.noexec")
            .what
            .contains("not executable")
    );
    assert!(
        find(&ps, "process.allowlist.open")
            .what
            .contains("world-writable")
    );
    assert!(
        find(&ps, "process.allowlist.dir")
            .what
            .contains("not a regular file")
    );
    assert!(
        find(&ps, "process.allowlist.planted")
            .what
            .contains("inside root `cwd`")
    );
    assert!(
        find(&ps, "process.allowlist.Bad")
            .what
            .contains("not a valid program name")
    );
    assert_eq!(
        find(&ps, "process.allowlist.weird.argz").what,
        "unknown key"
    );
    // Every message says what to do.
    assert!(ps.iter().all(|p| !p.fix.is_empty()), "{ps:#?}");
}

#[test]
fn other_settings_are_checked() {
    let s = Setup::new();
    let text = format!(
        "[process]\nrun_as = \"root\"\nmin_protection = \"max\"\nenv_pass = [\"CODEMANTLE_DEVICE_KEY\", \"LD_PRELOAD\", \"HOME\"]\nconnect_ports = [0, 70000]\nprivate_dir = \"{inside}\"\nbogus = 1\n[process.allowlist]\ntrue = \"/bin/true\"\n",
        inside = s.path("data/private").display(),
    );
    let ps = s.load(&text, &[]).unwrap_err();
    assert!(find(&ps, "process.run_as").what.contains("is root"));
    assert!(find(&ps, "process.min_protection").fix.contains("fs+net"));
    let env: Vec<&Problem> = ps.iter().filter(|p| p.key == "process.env_pass").collect();
    assert_eq!(env.len(), 3, "{env:#?}");
    assert_eq!(
        ps.iter()
            .filter(|p| p.key == "process.connect_ports")
            .count(),
        2
    );
    assert!(find(&ps, "process.private_dir").what.contains("overlap"));
    assert_eq!(find(&ps, "process.bogus").what, "unknown key");
}

#[test]
fn a_root_daemon_with_programs_needs_run_as() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let s = Setup::new();
    let ps = s
        .load("[process.allowlist]\ntrue = \"/bin/true\"\n", &[])
        .unwrap_err();
    assert!(find(&ps, "process.run_as").fix.contains("useradd"));
}

#[test]
fn env_overrides() {
    if !nix::unistd::geteuid().is_root() {
        return; // run_as needs a root daemon
    }
    let s = Setup::new();
    let loaded = s
        .load(
            "[process.allowlist]\ntrue = \"/bin/true\"\n",
            &[
                ("CODEMANTLE_PROCESS_RUN_AS", "65534:65534"),
                ("CODEMANTLE_PROCESS_CONNECT_PORTS", "443, 8443"),
                ("CODEMANTLE_PROCESS_ENV_PASS", "LANG,TZ"),
                ("CODEMANTLE_PROCESS_MAX_PROCESSES", "512"),
            ],
        )
        .unwrap_or_else(|p| panic!("{p:#?}"));
    let c = loaded.config.process;
    assert_eq!(c.run_as.unwrap().uid, 65534);
    assert_eq!(c.connect_ports, [443, 8443]);
    assert_eq!(c.env_pass, ["LANG", "TZ"]);
    assert_eq!(c.limits.max_processes, 512);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}
