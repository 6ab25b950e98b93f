//! Host facts for `h1` and telemetry for `p`, read from `/proc` (no extra crates).
//!
//! Everything here is best effort: a fact that cannot be read is left out (`h1`'s `hn` is
//! optional) or reported as 0 (telemetry); it never stops the tunnel.

use std::time::Instant;

use codemantle_protocol::message::Telemetry;

/// What the daemon says about its host in `h1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `hn`: the kernel host name, at most 64 characters; `None` if unreadable or empty.
    pub hostname: Option<String>,
    /// `os`: `<os>/<arch>` of this build, e.g. `linux/x86_64` (0.1.50 sent only the platform;
    /// the field is display-only, so the architecture rides along for the operator).
    pub os: String,
    /// `av`: this daemon's version.
    pub agent_version: String,
}

impl HostFacts {
    /// The facts of this host and build.
    pub fn current() -> HostFacts {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| truncate_chars(h.trim(), 64))
            .filter(|h| !h.is_empty());
        HostFacts {
            hostname,
            os: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
            agent_version: truncate_chars(env!("CARGO_PKG_VERSION"), 32),
        }
    }

    /// `h1.c`: 0.1.50's FNV-1a (32-bit) over the UTF-16 code units of
    /// `"<hostname>|<os>|<version>"`. Informational; control planes ignore it.
    pub fn fingerprint(&self) -> u32 {
        let text = format!(
            "{}|{}|{}",
            self.hostname.as_deref().unwrap_or(""),
            self.os,
            self.agent_version
        );
        fnv1a_utf16(&text)
    }
}

/// FNV-1a, 32-bit, over UTF-16 code units (each unit hashed as one value, as JavaScript's
/// `charCodeAt` loop does).
pub fn fnv1a_utf16(text: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for unit in text.encode_utf16() {
        hash ^= u32::from(unit);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

fn truncate_chars(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// The telemetry frame `p`: `u` seconds since the daemon started, `r` resident memory in bytes
/// (from `/proc/self/status` `VmRSS`), `a` the 1-minute load average ×100 (clamped to
/// 0..=65535; 0.1.50 put an always-0 handle count there and control planes ignore it).
pub fn telemetry(started: Instant) -> Telemetry {
    Telemetry {
        uptime_secs: started.elapsed().as_secs(),
        rss_bytes: rss_bytes().unwrap_or(0),
        active_handles: load_avg_x100().unwrap_or(0),
    }
}

/// Resident set size of this process in bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kb.checked_mul(1024)
}

fn load_avg_x100() -> Option<u16> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    parse_load_avg_x100(&text)
}

fn parse_load_avg_x100(text: &str) -> Option<u16> {
    let one: f64 = text.split_whitespace().next()?.parse().ok()?;
    if !one.is_finite() || one < 0.0 {
        return None;
    }
    // Saturating float → int conversion; 655.35 and above read as 65535.
    Some((one * 100.0).round().min(65_535.0) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_matches_reference() {
        // ref daemon §3.4: FNV-1a("buildbox-01|linux|0.1.50") = 112803242
        assert_eq!(fnv1a_utf16("buildbox-01|linux|0.1.50"), 112_803_242);
    }

    #[test]
    fn proc_parsing() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t    5120 kB\nVmSwap: 0 kB\n"),
            Some(5120 * 1024)
        );
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_load_avg_x100("0.52 0.40 0.30 1/123 4567\n"), Some(52));
        assert_eq!(parse_load_avg_x100("900.00 1 1 1/1 1\n"), Some(65_535));
        assert_eq!(parse_load_avg_x100("nan 1 1\n"), None);
    }

    #[test]
    fn facts_fit_the_wire() {
        let facts = HostFacts::current();
        assert!(facts.os.starts_with("linux/"));
        assert!(
            facts
                .hostname
                .as_ref()
                .is_none_or(|h| h.chars().count() <= 64)
        );
        assert!(rss_bytes().unwrap_or(0) > 0);
        let t = telemetry(Instant::now());
        assert_eq!(t.uptime_secs, 0);
    }
}
