//! Size, length, count and range limits of the v=1 wire protocol.
//!
//! Every limit a receiver enforces lives here as a named constant, so the decoder, the encoder
//! and the handlers agree on one number. The values come from what CodeMantle 0.1.50 accepts
//! (control-plane reference §2.2, §2.3, §2.7.2 and Appendix B; daemon reference §4, §5, §8.1,
//! §9.1): a frame we send must never be dropped by a 0.1.50 peer for breaking one of them, and a
//! frame we receive is rejected for breaking one *before* anything is allocated for it.
//!
//! Lengths of text fields are counted the way 0.1.50 counts them: in UTF-16 code units (the
//! JavaScript `.length`), unless a limit says [`LenUnit::Utf8Bytes`]. This matters for non-ASCII
//! paths: a 512-unit path may take up to 1536 UTF-8 bytes.
//!
//! Character-set rules (`^[A-Za-z0-9_-]{1,64}$` and friends) are part of the limits: 0.1.50
//! silently drops a frame whose session id or stream id breaks its regex, and identifiers that
//! pass through the codec are later used in URLs, file names and environment variables.

/// One mebibyte.
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Frames and structure
// ---------------------------------------------------------------------------------------------

/// Largest JSON (compat) frame accepted or produced: 24 MiB, the `MAX_FRAME_BYTES` (WebSocket
/// `maxPayload`) of both 0.1.50 peers. The largest legal 0.1.50 frame is a buffered `pv` with
/// 16 MiB of body as base64 (22 369 628 chars) plus 64 headers, which fits.
pub const MAX_JSON_FRAME_BYTES: usize = 24 * MIB;

/// Largest CBOR (native) frame accepted or produced: 17 MiB. Native frames carry proxy bodies
/// as raw bytes, so the largest legal frame is a `pv` with [`MAX_PROXY_RESPONSE_BYTES`] of body
/// plus at most 64 × 4 KiB of headers; 1 MiB of slack covers those and the envelope.
pub const MAX_CBOR_FRAME_BYTES: usize = 17 * MIB;

/// Deepest nesting of arrays/objects in a frame, counting the frame object itself as level 1.
/// Free-form payloads (`cc.cfg`) get the rest; compiled OpenCode configs use fewer than 10.
pub const MAX_DEPTH: usize = 32;

/// Most values (scalars, arrays and objects) in one JSON frame tree, and most values in one
/// free-form object (`cc.cfg`) in either codec. Bounds the memory a small-but-dense frame can
/// make the decoder allocate (`[0,0,0,…]` is 2 bytes per value on the wire but ~32 in memory).
/// 256 Ki values comfortably holds the 0.1.50 daemon's 256 KiB canonical config limit.
pub const MAX_VALUES: usize = 256 * 1024;

/// Most values in one free-form payload (`cc.cfg`), in either codec. Below [`MAX_VALUES`] so
/// that a payload the encoder accepts always fits the JSON frame budget with its envelope.
pub const MAX_FREE_FORM_VALUES: usize = 200_000;

/// Most keys in one message object (the frame itself or a nested record such as `si.j`). The
/// largest v=1 message (`cv` for a config push) has 18; the rest is room for native additions.
pub const MAX_MESSAGE_KEYS: usize = 64;

/// Longest key accepted in a message object, in bytes. v=1 keys are 1 to 3 characters.
pub const MAX_KEY_BYTES: usize = 16;

/// Longest `t` accepted for a message type this build does not know (see
/// [`crate::message::Message::Unknown`]). v=1 tags are 1 or 2 characters.
pub const MAX_TYPE_TAG_BYTES: usize = 16;

// ---------------------------------------------------------------------------------------------
// Text length rules
// ---------------------------------------------------------------------------------------------

/// How a text limit counts length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LenUnit {
    /// UTF-16 code units, like JavaScript's `String.prototype.length` (0.1.50's default).
    Utf16,
    /// UTF-8 bytes (used by 0.1.50 for JIT environment values).
    Utf8Bytes,
}

/// Which characters a text field may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// Anything (valid Unicode).
    Any,
    /// Anything except NUL.
    NoNul,
    /// `[A-Za-z0-9_-]`: base64url — ids, nonces, MACs, digests, root aliases.
    Id,
    /// `[A-Za-z0-9._:-]`: JIT credential references.
    Ref,
    /// `[A-Za-z0-9._-]`: template versions.
    Version,
    /// `[a-z0-9][a-z0-9_-]*`: template ids.
    TemplateId,
    /// `[A-Z_][A-Z0-9_]*`: environment variable names.
    EnvName,
    /// `[A-Za-z0-9-]`: HTTP header names.
    HeaderName,
    /// `[A-Z]`: HTTP methods.
    Upper,
}

impl Charset {
    /// True if `s` is made only of characters this set allows.
    pub fn accepts(self, s: &str) -> bool {
        let b = s.as_bytes();
        match self {
            Charset::Any => true,
            Charset::NoNul => !b.contains(&0),
            Charset::Id => b
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'),
            Charset::Ref => b
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-')),
            Charset::Version => b
                .iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')),
            Charset::TemplateId => match b.split_first() {
                None => true,
                Some((first, rest)) => {
                    (first.is_ascii_lowercase() || first.is_ascii_digit())
                        && rest.iter().all(|&c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-'
                        })
                }
            },
            Charset::EnvName => match b.split_first() {
                None => true,
                Some((first, rest)) => {
                    (first.is_ascii_uppercase() || *first == b'_')
                        && rest
                            .iter()
                            .all(|&c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
                }
            },
            Charset::HeaderName => b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-'),
            Charset::Upper => b.iter().all(|c| c.is_ascii_uppercase()),
        }
    }
}

/// The rule for one text field: length bounds (inclusive), unit and character set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextLimit {
    /// Shortest accepted length.
    pub min: usize,
    /// Longest accepted length.
    pub max: usize,
    /// How length is counted.
    pub unit: LenUnit,
    /// Allowed characters.
    pub charset: Charset,
}

impl TextLimit {
    /// Any characters, `min..=max` UTF-16 units.
    pub const fn new(min: usize, max: usize) -> TextLimit {
        TextLimit {
            min,
            max,
            unit: LenUnit::Utf16,
            charset: Charset::Any,
        }
    }

    /// The same limit restricted to `charset`.
    pub const fn chars(self, charset: Charset) -> TextLimit {
        TextLimit { charset, ..self }
    }

    /// The same limit counted in UTF-8 bytes.
    pub const fn bytes(self) -> TextLimit {
        TextLimit {
            unit: LenUnit::Utf8Bytes,
            ..self
        }
    }

    /// The same limit with a minimum of one (0.1.50 rejects empty optional strings).
    pub const fn non_empty(self) -> TextLimit {
        TextLimit { min: 1, ..self }
    }

    /// Longest encoding of an accepted value in UTF-8 bytes. A CBOR text header declaring more
    /// is rejected before its bytes are looked at.
    pub const fn max_utf8_bytes(&self) -> usize {
        match self.unit {
            // One UTF-16 unit is at most 3 UTF-8 bytes (a 4-byte character is 2 units).
            LenUnit::Utf16 => self.max.saturating_mul(3),
            LenUnit::Utf8Bytes => self.max,
        }
    }

    /// Checks `s` against the rule; on failure says which part broke.
    pub fn check(&self, s: &str) -> Result<(), &'static str> {
        let len = match self.unit {
            LenUnit::Utf8Bytes => s.len(),
            // UTF-16 length ≤ UTF-8 length, and ≥ a third of it: count only when it matters.
            LenUnit::Utf16 if s.len() <= self.max && s.len() >= self.min.saturating_mul(3) => {
                s.len()
            }
            LenUnit::Utf16 => s.encode_utf16().count(),
        };
        if len < self.min {
            return Err(if self.min == 1 && len == 0 {
                "must not be empty"
            } else {
                "too short"
            });
        }
        if len > self.max {
            return Err("too long");
        }
        if !self.charset.accepts(s) {
            return Err("character not allowed");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake (`h1`, `h2`)
// ---------------------------------------------------------------------------------------------

/// `h1.d`: device id, `^[A-Za-z0-9_-]{12,32}$`.
pub const DEVICE_ID: TextLimit = TextLimit::new(12, 32).chars(Charset::Id);
/// `h1.ak`: key id of the shared token, `^[A-Za-z0-9_-]{16,32}$` (0.1.50 sends 24).
pub const KEY_ID: TextLimit = TextLimit::new(16, 32).chars(Charset::Id);
/// `h1.at`: the raw token (legacy form), 1..256.
pub const AUTH_TOKEN: TextLimit = TextLimit::new(1, 256);
/// `h1.n`: client nonce, `^[A-Za-z0-9_-]{16,24}$`.
pub const CLIENT_NONCE: TextLimit = TextLimit::new(16, 24).chars(Charset::Id);
/// `h1.m`, `h2.m`: HMAC-SHA256 as unpadded base64url, exactly 43 characters.
pub const MAC: TextLimit = TextLimit::new(43, 43).chars(Charset::Id);
/// `h1.hn`: hostname, 1..64.
pub const HOSTNAME: TextLimit = TextLimit::new(1, 64);
/// `h1.os`: platform, 1..64.
pub const PLATFORM: TextLimit = TextLimit::new(1, 64);
/// `h1.av`: agent software version, 1..32.
pub const AGENT_VERSION: TextLimit = TextLimit::new(1, 32);
/// `h2.s`: connection session id, `^[A-Za-z0-9_-]{12,32}$`.
pub const CONNECTION_ID: TextLimit = TextLimit::new(12, 32).chars(Charset::Id);
/// `h2.n`: server nonce, `^[A-Za-z0-9_-]{16,24}$`.
pub const SERVER_NONCE: TextLimit = TextLimit::new(16, 24).chars(Charset::Id);
/// `h2.hb`: heartbeat interval in seconds (the daemon ignores an `h2` outside this).
pub const HEARTBEAT_SECS: (u64, u64) = (5, 120);
/// `h2.mx`: largest stream chunk the control plane accepts, in characters.
pub const MAX_CHUNK_ADVERTISED: (u64, u64) = (256, 8192);

// ---------------------------------------------------------------------------------------------
// Errors, telemetry
// ---------------------------------------------------------------------------------------------

/// `e.c` as text: the eight v=1 codes are at most 15 characters; unknown native codes ≤ 32.
pub const ERROR_CODE: TextLimit = TextLimit::new(1, 32);
/// `e.m`: error detail, 1..256.
pub const ERROR_TEXT: TextLimit = TextLimit::new(1, 256);
/// `p.a`: active handle count, 0..65535.
pub const ACTIVE_HANDLES: (u64, u64) = (0, 65_535);
/// `pl.p`: most ports in one port list.
pub const MAX_PORTS: usize = 64;
/// A TCP port (`pl.p[]`, `pr.p`, `sv.p`, `cu.os`, `cg.os`).
pub const PORT: (u64, u64) = (1, 65_535);

// ---------------------------------------------------------------------------------------------
// Files and directories
// ---------------------------------------------------------------------------------------------

/// `r`: root alias, `^[A-Za-z0-9_-]{1,16}$` (0.1.50 only knows `cwd`).
pub const ROOT_ALIAS: TextLimit = TextLimit::new(1, 16).chars(Charset::Id);
/// `p`, `rn.s`, `rn.d`, `si.p`, `sq.p`: a path relative to the root, ≤512 (may be empty).
pub const REL_PATH: TextLimit = TextLimit::new(0, 512);
/// `dr.l`: most entries asked for in one listing.
pub const DIR_LIMIT: (u64, u64) = (1, MAX_DIR_ENTRIES as u64);
/// `ds.e`: most entries in one listing.
pub const MAX_DIR_ENTRIES: usize = 256;
/// `dr.k`: paging cursor sent with a request, ≤128.
pub const DIR_CURSOR: TextLimit = TextLimit::new(0, 128);
/// `ds.k`: paging cursor in a listing, 1..128.
pub const LISTING_CURSOR: TextLimit = TextLimit::new(1, 128);
/// `ik` (native only): idempotency key of a mutating request, 8..64 base64url characters.
pub const IDEMPOTENCY_KEY: TextLimit = TextLimit::new(8, 64).chars(Charset::Id);
/// `ds.e[].name`: one directory entry name, 1..255.
pub const ENTRY_NAME: TextLimit = TextLimit::new(1, 255);

// ---------------------------------------------------------------------------------------------
// Sessions and streams
// ---------------------------------------------------------------------------------------------

/// Session ids (`si.s`, `st.s`, `sr.s`, `sv.s`, `jk.s`, `sp.s`): `^[A-Za-z0-9_-]{1,64}$`.
pub const SESSION_ID: TextLimit = TextLimit::new(1, 64).chars(Charset::Id);
/// Stream ids (`sl.x`, `sc.x`, `sa.x`, `sp.x`): `^[A-Za-z0-9_-]{8,24}$`.
pub const STREAM_ID: TextLimit = TextLimit::new(8, 24).chars(Charset::Id);
/// `sr.m`, `sv.m`: session outcome reason, 1..96.
pub const SESSION_REASON: TextLimit = TextLimit::new(1, 96);
/// `sr.u`: editor URL, 1..1024.
pub const SESSION_URL: TextLimit = TextLimit::new(1, 1024);
/// `sv.u`: editor URL in a status reply, 1..512.
pub const STATUS_URL: TextLimit = TextLimit::new(1, 512);
/// `sv.d`: OpenCode process id.
pub const PID: (u64, u64) = (1, (1 << 31) - 1);
/// `sv.pt`: the OpenCode process's sandbox, as the process guard reports it (`landlock-v6:fs+net+scope`).
pub const PROTECTION_REPORT: TextLimit = TextLimit::new(1, 64);
/// `sl.l`: most snapshot lines a replay may ask for.
pub const REPLAY_LINES: (u64, u64) = (1, 200);
/// `sc.d`: one stream chunk, at most 8192 characters (`MAX_STREAM_CHUNK_BYTES`).
pub const STREAM_CHUNK: TextLimit = TextLimit::new(0, 8192);
/// `sp.p`: prompt text, 1..8000 (`MAX_PROMPT_CHARS`).
pub const PROMPT: TextLimit = TextLimit::new(1, 8000);

// ---------------------------------------------------------------------------------------------
// JIT credentials (`si.j`, `jk`, `jv`)
// ---------------------------------------------------------------------------------------------

/// `j.t`: the credential token, 16..2048.
pub const JIT_TOKEN: TextLimit = TextLimit::new(16, 2048);
/// `j.s`: credential scope, 1..128.
pub const JIT_SCOPE: TextLimit = TextLimit::new(1, 128);
/// `j.n`, `j.v[][0]`: environment variable name, `^[A-Z_][A-Z0-9_]{1,63}$`.
pub const ENV_NAME: TextLimit = TextLimit::new(2, 64).chars(Charset::EnvName);
/// `j.v[][1]`: environment value, non-empty, no NUL, ≤2048 UTF-8 bytes.
pub const ENV_VALUE: TextLimit = TextLimit::new(1, 2048).bytes().chars(Charset::NoNul);
/// `j.v`: most extra environment pairs.
pub const MAX_ENV_PAIRS: usize = 8;
/// `j.r`, `jk.r`: credential reference, `^[A-Za-z0-9._:-]{1,128}$`.
pub const CREDENTIAL_REF: TextLimit = TextLimit::new(1, 128).chars(Charset::Ref);
/// `jk.m`: kill-switch reason, ≤128.
pub const KILL_REASON: TextLimit = TextLimit::new(0, 128);
/// `jv.m`: kill-switch outcome, 1..160.
pub const KILL_OUTCOME: TextLimit = TextLimit::new(1, 160);
/// `jr.tl`: shortest renewal lifetime in seconds (as [`crate::jit::MIN_TTL_MS`]).
pub const MIN_JIT_TTL_SECS: u64 = crate::jit::MIN_TTL_MS / 1000;
/// `jr.tl`: longest renewal lifetime in seconds (as [`crate::jit::MAX_TTL_MS`]).
pub const MAX_JIT_TTL_SECS: u64 = crate::jit::MAX_TTL_MS / 1000;

// ---------------------------------------------------------------------------------------------
// Setup (`cf`/`cg`, `cu`/`cv`)
// ---------------------------------------------------------------------------------------------

/// `cu.u`, `cg.u`: control-plane URL, ≤512.
pub const SETUP_URL: TextLimit = TextLimit::new(0, 512);
/// `cu.a`: a new agent token (empty keeps the current one), ≤512.
pub const SETUP_TOKEN: TextLimit = TextLimit::new(0, 512);
/// `cu.oc`, `cg.oc`: OpenCode command, ≤256.
pub const OPENCODE_COMMAND: TextLimit = TextLimit::new(0, 256);
/// `cu.oh`, `cu.op`, `cu.om` (and their `cg` twins): host, provider id, model id, ≤128.
pub const SETUP_SHORT: TextLimit = TextLimit::new(0, 128);
/// `cu.rt`, `cg.rt`: request timeout in milliseconds.
pub const REQUEST_TIMEOUT_MS: (u64, u64) = (1_000, 120_000);
/// `cg.m`, `cv.m` (setup): outcome text, 1..96.
pub const SETUP_MESSAGE: TextLimit = TextLimit::new(1, 96);

// ---------------------------------------------------------------------------------------------
// Config push (`cc` / `cv` with `k:"cfg"`)
// ---------------------------------------------------------------------------------------------

/// `tid`: template id, `^[a-z0-9][a-z0-9_-]{2,63}$`.
pub const TEMPLATE_ID: TextLimit = TextLimit::new(3, 64).chars(Charset::TemplateId);
/// `tv`: template version, `^[A-Za-z0-9._-]{1,32}$`.
pub const TEMPLATE_VERSION: TextLimit = TextLimit::new(1, 32).chars(Charset::Version);
/// `pd`: SHA-256 digest as unpadded base64url, 43 characters.
pub const DIGEST: TextLimit = TextLimit::new(43, 43).chars(Charset::Id);
/// `ap`: apply path, ≤256.
pub const APPLY_PATH: TextLimit = TextLimit::new(0, 256);
/// `alg`: signature algorithm, 1..64.
pub const SIGNATURE_ALG: TextLimit = TextLimit::new(1, 64);
/// `sg`: signature, 1..512.
pub const SIGNATURE: TextLimit = TextLimit::new(1, 512);
/// `vd`: most violation codes in one reply.
pub const MAX_VIOLATIONS: usize = 32;
/// `vd[]`: one violation code, ≤160.
pub const VIOLATION: TextLimit = TextLimit::new(0, 160);
/// `cv.m` (config): outcome text, 1..256.
pub const CONFIG_MESSAGE: TextLimit = TextLimit::new(1, 256);

// ---------------------------------------------------------------------------------------------
// Port proxy (`pr`, `pv`, `ps`)
// ---------------------------------------------------------------------------------------------

/// `pr.m`: HTTP method, `^[A-Z]{3,10}$`.
pub const HTTP_METHOD: TextLimit = TextLimit::new(3, 10).chars(Charset::Upper);
/// `pr.u`: path and query, 1..2048.
pub const PROXY_TARGET: TextLimit = TextLimit::new(1, 2048);
/// `pr.h`, `pv.h`: most headers.
pub const MAX_HEADERS: usize = 64;
/// Header name, `^[A-Za-z0-9-]{1,64}$`.
pub const HEADER_NAME: TextLimit = TextLimit::new(1, 64).chars(Charset::HeaderName);
/// Header value, ≤4096.
pub const HEADER_VALUE: TextLimit = TextLimit::new(0, 4096);
/// `pr.b`: request body; 0.1.50 caps the base64 text at 2 000 000 characters.
pub const MAX_PROXY_REQUEST_BASE64: usize = 2_000_000;
/// `pr.b` decoded: the largest request body, in bytes.
pub const MAX_PROXY_REQUEST_BYTES: usize = MAX_PROXY_REQUEST_BASE64 / 4 * 3;
/// `pv.b`, `ps.d` decoded: the largest response body or stream chunk (`PORT_PROXY_MAX_RESPONSE_BYTES`).
pub const MAX_PROXY_RESPONSE_BYTES: usize = 16 * MIB;
/// `pv.b`, `ps.d` as base64 text: ceil(16 MiB / 3) · 4 + 4, as 0.1.50's control plane checks.
pub const MAX_PROXY_RESPONSE_BASE64: usize = MAX_PROXY_RESPONSE_BYTES.div_ceil(3) * 4 + 4;
/// `pv.sc`: HTTP status code.
pub const HTTP_STATUS: (u64, u64) = (100, 599);
/// `pv.sm`: HTTP status text, 1..128.
pub const HTTP_STATUS_TEXT: TextLimit = TextLimit::new(1, 128);
/// `pv.m`: proxy failure text, 1..256.
pub const PROXY_ERROR: TextLimit = TextLimit::new(1, 256);

// ---------------------------------------------------------------------------------------------
// Git (`g*`)
// ---------------------------------------------------------------------------------------------

/// `gk.u`: repository URL, ≤2048.
pub const GIT_URL: TextLimit = TextLimit::new(0, 2048);
/// Branch and other ref names (`gk.b`, `gh.b`, `gm.b`, `gx.b`, `gc.n`), ≤256.
pub const GIT_REF: TextLimit = TextLimit::new(0, 256);
/// `gh.o`, `gm.o`: remote name, ≤64.
pub const GIT_REMOTE: TextLimit = TextLimit::new(0, 64);
/// `ga.f`: pathspec, ≤512.
pub const GIT_PATHSPEC: TextLimit = TextLimit::new(0, 512);
/// `gp.m`: commit message, ≤1024.
pub const COMMIT_MESSAGE: TextLimit = TextLimit::new(0, 1024);
/// `gf.n`, `gf.e`, `gv.n`, `gv.e`: user name and email, ≤256.
pub const GIT_IDENTITY: TextLimit = TextLimit::new(0, 256);
/// `gv.h`: credential helper, ≤128.
pub const GIT_HELPER: TextLimit = TextLimit::new(0, 128);
/// `gv.m`: git config outcome, ≤1200.
pub const GIT_CONFIG_MESSAGE: TextLimit = TextLimit::new(0, 1200);
/// Git reply text (`m`, `e`, `h`, `b`, `c` of `gt`/`gj`/`gl`/…). 0.1.50 truncates summaries to
/// 1200 characters and its control plane does not check; we allow 4096.
pub const GIT_TEXT: TextLimit = TextLimit::new(0, 4096);
/// `gt.a/m/u/d`, `gu.b`: most file or branch names in one git reply.
pub const MAX_GIT_LIST: usize = 10_000;
/// `gq.m`: one live git output line, 1..500.
pub const GIT_LOG_LINE: TextLimit = TextLimit::new(1, 500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_length_counts_like_javascript() {
        let four = TextLimit::new(0, 4);
        assert!(four.check("abcd").is_ok());
        assert_eq!(four.check("abcde"), Err("too long"));
        // "é" is 2 UTF-8 bytes but 1 UTF-16 unit; "😀" is 4 bytes and 2 units.
        assert!(four.check("éééé").is_ok());
        assert!(four.check("😀😀").is_ok());
        assert_eq!(four.check("😀😀é"), Err("too long"));
        assert_eq!(TextLimit::new(1, 4).bytes().check("éàè"), Err("too long"));
    }

    #[test]
    fn charsets() {
        assert!(SESSION_ID.check("ses_AcmT-jQ").is_ok());
        assert!(SESSION_ID.check("ses/x").is_err());
        assert!(SESSION_ID.check("").is_err());
        assert!(ENV_NAME.check("OPENCODE_SESSION_TOKEN").is_ok());
        assert!(ENV_NAME.check("9ABC").is_err());
        assert!(TEMPLATE_ID.check("build-box").is_ok());
        assert!(TEMPLATE_ID.check("-build").is_err());
        assert!(HTTP_METHOD.check("GET").is_ok());
        assert!(HTTP_METHOD.check("get").is_err());
        assert!(CREDENTIAL_REF.check("a.b:c-d_e").is_ok());
        assert!(ENV_VALUE.check("a\0b").is_err());
    }

    #[test]
    fn proxy_body_limits_match_reference() {
        assert_eq!(MAX_PROXY_RESPONSE_BASE64, 22_369_628);
        assert_eq!(MAX_PROXY_REQUEST_BYTES, 1_500_000);
    }
}
