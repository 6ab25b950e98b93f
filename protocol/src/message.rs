//! The v=1 message vocabulary: one Rust type per `t`, and the [`Message`] enum over all of them.
//!
//! Field names say what a field is (`request_id`, `root`, `path`, `session_id`…); the wire keys
//! stay the compact ones 0.1.50 uses (`i`, `r`, `p`, `s`…) and are listed in each field's doc.
//! Every frame carries the envelope `v` (always 1, except [`Message::HelloUnsupported`]), `t`
//! (see [`Message::type_tag`]) and, for requests and their replies, `i` (`request_id`).
//!
//! Flags that are `0|1` on the wire are `bool`. Fields that 0.1.x may leave out are `Option`
//! (or a `bool`/`Vec` whose default is what absence means). Some fields are **native-only**:
//! CBOR peers exchange them, JSON peers never see them and decode them as their default; each
//! is marked "Native only" below. [`Message::to_compat`] shows what a JSON peer would receive.
//!
//! Direction: "CP → D" is control plane to daemon, "D → CP" daemon to control plane.
//!
//! Limits for every field are in [`crate::limits`]; [`crate::codec::encode`] refuses a message
//! that breaks one, and [`crate::codec::decode`] refuses a frame that does.

use serde_json::Value;

use crate::codec::field::{
    Bytes, Clamp32, Code, EntryList, FLAG, FLAG_ALWAYS, FLAG_IF_CLEARED, FLAG_IF_SET, Fields,
    JsonObject, List, Opt, PairOf, RequestId, Text, WireEnum, WireObject, check_keys, enumeration,
    object, uint,
};
use crate::codec::val::Val;
use crate::codec::{Codec, Sink, wire_object};
use crate::error::{DecodeError, EncodeError, ErrorCode};
use crate::limits::{self, TextLimit};

/// The only protocol version this crate speaks.
pub const PROTOCOL_VERSION: u64 = 1;

// ---------------------------------------------------------------------------------------------
// Small shared types
// ---------------------------------------------------------------------------------------------

/// One entry of a directory listing (`ds.e[]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DirEntry {
    /// A directory. JSON: `["d", name, 0]`; CBOR: `[name]`.
    Dir {
        /// Entry name (no `/`), 1..255.
        name: String,
    },
    /// A regular file. JSON: `["f", name, size, mtime]` with both numbers clamped to uint32 (so
    /// a 0.1.x peer always sees mtime 4294967295); CBOR: `[name, size, mtime_ms]`, full values.
    File {
        /// Entry name (no `/`), 1..255.
        name: String,
        /// Size in bytes.
        size: u64,
        /// Modification time, milliseconds since the Unix epoch.
        mtime_ms: u64,
    },
}

impl DirEntry {
    /// The entry's name.
    pub fn name(&self) -> &str {
        match self {
            DirEntry::Dir { name } | DirEntry::File { name, .. } => name,
        }
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self, DirEntry::Dir { .. })
    }
}

/// A `[name, value]` pair: an HTTP header (`pr.h`, `pv.h`) or an environment variable (`j.v`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pair {
    /// Header or variable name.
    pub name: String,
    /// Its value.
    pub value: String,
}

impl Pair {
    /// A pair from anything string-like.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Pair {
        Pair {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// An HTTP header `[name, value]`.
pub type Header = Pair;
/// An environment variable `[name, value]`.
pub type EnvVar = Pair;

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $( $(#[$vmeta])* $variant, )* }

        impl $name {
            /// The wire spelling.
            pub fn as_str(self) -> &'static str {
                match self { $( $name::$variant => $text, )* }
            }

            /// Parses the wire spelling.
            pub fn parse(s: &str) -> Option<$name> {
                match s { $( $text => Some($name::$variant), )* _ => None }
            }
        }

        impl WireEnum for $name {
            const ALL: &'static [Self] = &[$( $name::$variant, )*];
            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// `ph`: which phase a config payload is for.
    pub enum ConfigPhase {
        /// `session-init`: injected when a session starts.
        SessionInit = "session-init",
        /// `runtime`: written to the OpenCode config file.
        Runtime = "runtime",
    }
}

wire_enum! {
    /// `sc` (of `cc`/`cv`): how much of the config a payload covers.
    pub enum ConfigScope {
        /// `session-init`.
        SessionInit = "session-init",
        /// `full`.
        Full = "full",
    }
}

wire_enum! {
    /// `pm`: config policy mode.
    pub enum PolicyMode {
        /// `off`.
        Off = "off",
        /// `read-only`.
        ReadOnly = "read-only",
        /// `restricted`: fixed apply path, signature required.
        Restricted = "restricted",
    }
}

wire_enum! {
    /// `cv.st`: what the daemon did with a config push.
    pub enum ConfigOutcome {
        /// `applied`.
        Applied = "applied",
        /// `rejected`.
        Rejected = "rejected",
    }
}

wire_enum! {
    /// `gc.a`: branch action.
    pub enum BranchAction {
        /// `list`.
        List = "list",
        /// `create`.
        Create = "create",
        /// `delete`.
        Delete = "delete",
    }
}

wire_enum! {
    /// `gf.a`: git config action.
    pub enum GitConfigAction {
        /// `get`.
        Get = "get",
        /// `set`.
        Set = "set",
    }
}

wire_enum! {
    /// `gq.s`: which stream a live git output line came from.
    pub enum GitLogStream {
        /// `meta`: the command line, truncation and completion notes.
        Meta = "meta",
        /// `out`: standard output.
        Out = "out",
        /// `err`: standard error.
        Err = "err",
    }
}

// Kinds used by many messages.
const TEXT_ROOT: Text = Text(limits::ROOT_ALIAS);
const TEXT_PATH: Text = Text(limits::REL_PATH);
const GIT_TEXT: Opt<Text> = Opt(Text(limits::GIT_TEXT));
const HEADERS: List<PairOf> = List {
    max: limits::MAX_HEADERS,
    item: PairOf {
        name: limits::HEADER_NAME,
        value: limits::HEADER_VALUE,
    },
    omit_empty: false,
};
const GIT_LIST: Opt<List<Text>> = Opt(List {
    max: limits::MAX_GIT_LIST,
    item: Text(limits::GIT_TEXT),
    omit_empty: false,
});
const PORT: crate::codec::field::Uint<u16> = uint::<u16>(limits::PORT);

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

wire_object! {
    /// `h1` (D → CP): handshake init. Verified by [`crate::handshake`]; the codec checks shapes
    /// only (at least one of `ak`/`at` is the verifier's rule).
    pub struct Hello {
        /// `d`: claimed device id, `^[A-Za-z0-9_-]{12,32}$`.
        pub device_id: String = "d" => Text(limits::DEVICE_ID),
        /// `at`: the raw token (legacy form; 0.1.50 daemons never send it).
        pub auth_token: Option<String> = "at" => Opt(Text(limits::AUTH_TOKEN)),
        /// `ak`: key id of the token.
        pub key_id: Option<String> = "ak" => Opt(Text(limits::KEY_ID)),
        /// `n`: client nonce.
        pub nonce: String = "n" => Text(limits::CLIENT_NONCE),
        /// `ts`: client clock, Unix milliseconds.
        pub timestamp_ms: u64 = "ts" => uint::<u64>((0, u64::MAX)),
        /// `m`: HMAC-SHA256, unpadded base64url.
        pub mac: String = "m" => Text(limits::MAC),
        /// `c`: FNV-1a fingerprint of `hostname|platform|version` (informational).
        pub fingerprint: Option<u32> = "c" => Opt(uint::<u32>((0, u32::MAX as u64))),
        /// `hn`: hostname.
        pub hostname: Option<String> = "hn" => Opt(Text(limits::HOSTNAME)),
        /// `os`: platform (`linux`, …).
        pub os: Option<String> = "os" => Opt(Text(limits::PLATFORM)),
        /// `av`: agent software version.
        pub agent_version: Option<String> = "av" => Opt(Text(limits::AGENT_VERSION)),
    }
}

/// `h1` with a protocol version other than 1: only the version is kept, because the rest of
/// the frame may follow another version's rules. The control plane answers `UPDATE_REQUIRED`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedHello {
    /// `v` as received (never 1).
    pub version: u64,
}

wire_object! {
    /// `h2` (CP → D): handshake acknowledgement.
    pub struct HelloAck {
        /// `s`: connection session id.
        pub connection_id: String = "s" => Text(limits::CONNECTION_ID),
        /// `n`: server nonce.
        pub nonce: String = "n" => Text(limits::SERVER_NONCE),
        /// `hb`: heartbeat interval in seconds, 5..120.
        pub heartbeat_secs: u32 = "hb" => uint::<u32>(limits::HEARTBEAT_SECS),
        /// `mx`: largest stream chunk accepted, 256..8192.
        pub max_chunk: u32 = "mx" => uint::<u32>(limits::MAX_CHUNK_ADVERTISED),
        /// `m`: HMAC-SHA256 over the h2 string, unpadded base64url.
        pub mac: String = "m" => Text(limits::MAC),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and telemetry
// ---------------------------------------------------------------------------------------------

wire_object! {
    /// `e` (both directions): an error, answering request `request_id` if set.
    pub struct ErrorFrame {
        /// `i`: the request this answers.
        pub request_id: Option<u32> = "i" => Opt(RequestId),
        /// `c`: the code.
        pub code: ErrorCode = "c" => Code,
        /// `m`: detail, 1..256 (0.1.50 daemons never send one).
        pub message: Option<String> = "m" => Opt(Text(limits::ERROR_TEXT)),
    }
}

wire_object! {
    /// `p` (D → CP): telemetry, sent after the handshake and every heartbeat.
    pub struct Telemetry {
        /// `u`: daemon process uptime in seconds (uint32 in JSON, clamped).
        pub uptime_secs: u64 = "u" => Clamp32,
        /// `r`: resident set size in bytes (uint32 in JSON, clamped).
        pub rss_bytes: u64 = "r" => Clamp32,
        /// `a`: active handle count (0 unless enabled).
        pub active_handles: u16 = "a" => uint::<u16>(limits::ACTIVE_HANDLES),
    }
}

wire_object! {
    /// `pl` (D → CP): the ports the daemon exposes for proxying.
    pub struct PortList {
        /// `p`: ports, at most 64.
        pub ports: Vec<u16> = "p" => List { max: limits::MAX_PORTS, item: PORT, omit_empty: false },
    }
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

wire_object! {
    /// `dr` (CP → D): list a directory.
    pub struct DirList {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias (`cwd`).
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: directory, relative to the root.
        pub path: String = "p" => TEXT_PATH,
        /// `l`: most entries wanted, 1..256.
        pub limit: u16 = "l" => uint::<u16>(limits::DIR_LIMIT),
        /// `k`: paging cursor from a previous listing.
        pub cursor: Option<String> = "k" => Opt(Text(limits::DIR_CURSOR)),
    }
}

wire_object! {
    /// `ds` (D → CP): a directory listing.
    pub struct DirListing {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `k`: cursor for the next page (0.1.50 only echoes the request's cursor).
        pub cursor: Option<String> = "k" => Opt(Text(limits::LISTING_CURSOR)),
        /// `e`: entries, at most 256.
        pub entries: Vec<DirEntry> = "e" => EntryList { max: limits::MAX_DIR_ENTRIES },
    }
}

wire_object! {
    /// A request naming a directory under a root: `md` (mkdir), `gs` (git status),
    /// `gi` (git init).
    pub struct PathRequest {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: path relative to the root.
        pub path: String = "p" => TEXT_PATH,
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `rd` (CP → D): remove a directory.
    pub struct RemoveDir {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: directory relative to the root.
        pub path: String = "p" => TEXT_PATH,
        /// `rc`: remove contents too. Native only; 0.1.x removes empty directories only.
        pub recursive: bool = "rc" => FLAG_IF_SET; native,
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `rn` (CP → D): rename within a root.
    pub struct Rename {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `s`: source path.
        pub source: String = "s" => TEXT_PATH,
        /// `d`: destination path.
        pub dest: String = "d" => TEXT_PATH,
        /// `ow`: replace an existing destination. Native only (written only when `false`);
        /// 0.1.x always replaces, so JSON frames decode as `true`.
        pub overwrite: bool = "ow" => FLAG_IF_CLEARED; native,
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// Outcome of a file operation: `mr` (mkdir), `rr` (rmdir), `rp` (rename). Failures come as
    /// `e` frames; 0.1.50's control plane rejects an `m` here, so there is none.
    pub struct FsResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: success.
        pub ok: bool = "o" => FLAG,
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions and streams
// ---------------------------------------------------------------------------------------------

wire_object! {
    /// `si.j`: a just-in-time credential handed to the OpenCode process.
    pub struct JitCredential {
        /// `t`: the opaque token, 16..2048.
        pub token: String = "t" => Text(limits::JIT_TOKEN),
        /// `e`: expiry, Unix milliseconds.
        pub expires_at_ms: u64 = "e" => uint::<u64>((0, u64::MAX)),
        /// `s`: scope.
        pub scope: Option<String> = "s" => Opt(Text(limits::JIT_SCOPE)),
        /// `n`: environment variable that receives the token.
        pub env_name: Option<String> = "n" => Opt(Text(limits::ENV_NAME)),
        /// `r`: credential reference (for the kill switch).
        pub credential_ref: Option<String> = "r" => Opt(Text(limits::CREDENTIAL_REF)),
        /// `v`: extra environment variables, at most 8.
        pub env: Vec<EnvVar> = "v" => List {
            max: limits::MAX_ENV_PAIRS,
            item: PairOf { name: limits::ENV_NAME, value: limits::ENV_VALUE },
            omit_empty: true,
        },
    }
}

wire_object! {
    /// `si` (CP → D): start (or reuse) an OpenCode session for a folder.
    pub struct StartSession {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `s`: proposed session id.
        pub session_id: String = "s" => Text(limits::SESSION_ID),
        /// `p`: folder relative to the root (default `.`).
        pub folder: Option<String> = "p" => Opt(TEXT_PATH),
        /// `j`: JIT credential.
        pub jit: Option<JitCredential> = "j" => Opt(object::<JitCredential>()),
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `st` (CP → D): stop a session.
    pub struct StopSession {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `s`: session id.
        pub session_id: String = "s" => Text(limits::SESSION_ID),
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `sr` (D → CP): outcome of `si` or `st`.
    pub struct SessionResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `s`: the effective session id.
        pub session_id: String = "s" => Text(limits::SESSION_ID),
        /// `o`: success.
        pub ok: bool = "o" => FLAG,
        /// `m`: reason (`session_reused`, `opencode_down`, …).
        pub reason: Option<String> = "m" => Opt(Text(limits::SESSION_REASON)),
        /// `u`: editor URL.
        pub url: Option<String> = "u" => Opt(Text(limits::SESSION_URL)),
    }
}

wire_object! {
    /// `sq` (CP → D): session status for a folder.
    pub struct SessionStatusQuery {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `p`: folder relative to the root.
        pub folder: String = "p" => TEXT_PATH,
    }
}

wire_object! {
    /// `sv` (D → CP): session status.
    pub struct SessionStatus {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: an OpenCode server is running for the folder.
        pub running: bool = "o" => FLAG,
        /// `s`: session id, when known.
        pub session_id: Option<String> = "s" => Opt(Text(limits::SESSION_ID)),
        /// `p`: OpenCode port.
        pub port: Option<u16> = "p" => Opt(PORT),
        /// `d`: OpenCode process id.
        pub pid: Option<u32> = "d" => Opt(uint::<u32>(limits::PID)),
        /// `u`: editor URL.
        pub url: Option<String> = "u" => Opt(Text(limits::STATUS_URL)),
        /// `m`: reason (`not_running`, `daemon_not_ready`, …).
        pub reason: Option<String> = "m" => Opt(Text(limits::SESSION_REASON)),
        /// `pt`: how the OpenCode process is confined, as the daemon's process guard reported
        /// it at spawn (`landlock-v6:fs+net+scope`, `landlock-v3:fs`, `none`). Native only.
        pub protection: Option<String> = "pt" => Opt(Text(limits::PROTECTION_REPORT)); native,
    }
}

wire_object! {
    /// `sl` (CP → D): replay the last lines of the session log as a stream of `sc`.
    pub struct ReplayLog {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `x`: stream id the chunks will carry.
        pub stream_id: String = "x" => Text(limits::STREAM_ID),
        /// `l`: number of lines, 1..200.
        pub lines: u16 = "l" => uint::<u16>(limits::REPLAY_LINES),
    }
}

wire_object! {
    /// `sc` (D → CP): one chunk of a stream. Carries no `i`; streams are keyed by `x`.
    pub struct StreamChunk {
        /// `x`: stream id.
        pub stream_id: String = "x" => Text(limits::STREAM_ID),
        /// `q`: sequence number from 0.
        pub seq: u32 = "q" => uint::<u32>((0, u32::MAX as u64)),
        /// `e`: last chunk of the stream.
        pub last: bool = "e" => FLAG,
        /// `d`: text, at most 8192 characters (may be empty).
        pub data: String = "d" => Text(limits::STREAM_CHUNK),
    }
}

wire_object! {
    /// `sa` (CP → D): acknowledges chunk `seq` of stream `stream_id`.
    pub struct StreamAck {
        /// `x`: stream id.
        pub stream_id: String = "x" => Text(limits::STREAM_ID),
        /// `q`: sequence number acknowledged.
        pub seq: u32 = "q" => uint::<u32>((0, u32::MAX as u64)),
    }
}

wire_object! {
    /// `sp` (CP → D): send a prompt to a session (fire-and-forget; 0.1.50 daemons ignore it).
    pub struct Prompt {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `x`: stream id for the output.
        pub stream_id: String = "x" => Text(limits::STREAM_ID),
        /// `s`: session id.
        pub session_id: String = "s" => Text(limits::SESSION_ID),
        /// `p`: prompt text, 1..8000.
        pub prompt: String = "p" => Text(limits::PROMPT),
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

// ---------------------------------------------------------------------------------------------
// Port proxy
// ---------------------------------------------------------------------------------------------

wire_object! {
    /// `pr` (CP → D): an HTTP request to a local port.
    pub struct ProxyRequest {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `p`: target port on the daemon's loopback.
        pub port: u16 = "p" => PORT,
        /// `m`: method, `^[A-Z]{3,10}$`.
        pub method: String = "m" => Text(limits::HTTP_METHOD),
        /// `u`: path and query.
        pub target: String = "u" => Text(limits::PROXY_TARGET),
        /// `h`: headers, at most 64.
        pub headers: Vec<Header> = "h" => HEADERS,
        /// `b`: body (base64 in JSON, always written; absent reads as empty).
        pub body: Vec<u8> = "b" => Bytes {
            max_base64: limits::MAX_PROXY_REQUEST_BASE64,
            max_bytes: limits::MAX_PROXY_REQUEST_BYTES,
            absent_empty: true,
        },
    }
}

wire_object! {
    /// `pv` (D → CP): the proxied response (or its head, when `streaming`).
    pub struct ProxyResponse {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: the upstream answered.
        pub ok: bool = "o" => FLAG,
        /// `sc`: HTTP status.
        pub status: Option<u16> = "sc" => Opt(uint::<u16>(limits::HTTP_STATUS)),
        /// `sm`: HTTP status text.
        pub status_text: Option<String> = "sm" => Opt(Text(limits::HTTP_STATUS_TEXT)),
        /// `h`: response headers, at most 64.
        pub headers: Option<Vec<Header>> = "h" => Opt(HEADERS),
        /// `b`: body (base64 in JSON).
        pub body: Option<Vec<u8>> = "b" => Opt(Bytes {
            max_base64: limits::MAX_PROXY_RESPONSE_BASE64,
            max_bytes: limits::MAX_PROXY_RESPONSE_BYTES,
            absent_empty: false,
        }),
        /// `m`: failure text (`port_not_exposed`, …).
        pub error: Option<String> = "m" => Opt(Text(limits::PROXY_ERROR)),
        /// `ss`: the body follows as `ps` chunks ended by `pe`.
        pub streaming: bool = "ss" => FLAG_IF_SET,
    }
}

wire_object! {
    /// `ps` (D → CP): a chunk of a streamed proxy response.
    pub struct ProxyChunk {
        /// `i`: the `pr` request id.
        pub request_id: u32 = "i" => RequestId,
        /// `d`: the chunk (base64 in JSON).
        pub data: Vec<u8> = "d" => Bytes {
            max_base64: limits::MAX_PROXY_RESPONSE_BASE64,
            max_bytes: limits::MAX_PROXY_RESPONSE_BYTES,
            absent_empty: false,
        },
    }
}

wire_object! {
    /// `pw` (CP → D, native only): flow-control credit for a streamed proxy answer. The
    /// control plane's HTTP client has taken `bytes` more of request `i`'s body, so the daemon
    /// may have that many more in flight. 0.1.x daemons never get it (and never wait for it).
    pub struct ProxyWindow {
        /// `i`: the `pr` request id.
        pub request_id: u32 = "i" => RequestId,
        /// `n`: bytes consumed since the last `pw`.
        pub bytes: u32 = "n" => uint::<u32>((1, u32::MAX as u64)),
    }
}

wire_object! {
    /// A message that carries only its request id: `pe` (end of a streamed proxy response) and
    /// `cf` (setup status query).
    pub struct RequestOnly {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
    }
}

// ---------------------------------------------------------------------------------------------
// Setup and config push
// ---------------------------------------------------------------------------------------------

wire_object! {
    /// `cg` (D → CP): the daemon's setup. Empty strings and zeros are left out.
    pub struct SetupStatus {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: always true from 0.1.50.
        pub ok: bool = "o" => FLAG,
        /// `c`: URL and token are both set.
        pub configured: bool = "c" => FLAG_IF_SET,
        /// `u`: control-plane URL.
        pub control_plane_url: Option<String> = "u" => Opt(Text(limits::SETUP_URL.non_empty())),
        /// `a`: a token is set (the token itself is never sent).
        pub has_token: bool = "a" => FLAG_IF_SET,
        /// `oc`: OpenCode command.
        pub opencode_command: Option<String> = "oc" => Opt(Text(limits::OPENCODE_COMMAND.non_empty())),
        /// `oh`: OpenCode host.
        pub opencode_host: Option<String> = "oh" => Opt(Text(limits::SETUP_SHORT.non_empty())),
        /// `os`: first OpenCode port.
        pub opencode_start_port: Option<u16> = "os" => Opt(PORT),
        /// `op`: provider id.
        pub provider_id: Option<String> = "op" => Opt(Text(limits::SETUP_SHORT.non_empty())),
        /// `om`: model id.
        pub model_id: Option<String> = "om" => Opt(Text(limits::SETUP_SHORT.non_empty())),
        /// `rt`: request timeout in milliseconds.
        pub request_timeout_ms: Option<u32> = "rt" => Opt(uint::<u32>(limits::REQUEST_TIMEOUT_MS)),
        /// `m`: message.
        pub message: Option<String> = "m" => Opt(Text(limits::SETUP_MESSAGE)),
    }
}

wire_object! {
    /// `cu` (CP → D): save setup to the daemon's `.env` (takes effect on restart).
    pub struct SetupSave {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `u`: control-plane URL (`ws://` or `wss://`).
        pub control_plane_url: String = "u" => Text(limits::SETUP_URL),
        /// `a`: new token; empty keeps the current one (0.1.50's control plane always sends "").
        pub auth_token: String = "a" => Text(limits::SETUP_TOKEN),
        /// `oc`: OpenCode command.
        pub opencode_command: Option<String> = "oc" => Opt(Text(limits::OPENCODE_COMMAND)),
        /// `oh`: OpenCode host.
        pub opencode_host: Option<String> = "oh" => Opt(Text(limits::SETUP_SHORT)),
        /// `os`: first OpenCode port.
        pub opencode_start_port: Option<u16> = "os" => Opt(PORT),
        /// `op`: provider id.
        pub provider_id: Option<String> = "op" => Opt(Text(limits::SETUP_SHORT)),
        /// `om`: model id.
        pub model_id: Option<String> = "om" => Opt(Text(limits::SETUP_SHORT)),
        /// `rt`: request timeout in milliseconds.
        pub request_timeout_ms: Option<u32> = "rt" => Opt(uint::<u32>(limits::REQUEST_TIMEOUT_MS)),
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `cv` without `k` (or with `k:"setup"`) (D → CP): outcome of `cu`.
    pub struct SetupSaveResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: saved.
        pub ok: bool = "o" => FLAG,
        /// `m`: `saved_restart_required`, `setup_save_failed`, …
        pub message: Option<String> = "m" => Opt(Text(limits::SETUP_MESSAGE)),
    }
}

wire_object! {
    /// `cc` (CP → D): push a compiled config. Always carries `k:"cfg"` after `i`.
    pub struct ConfigPush {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        const "k" = "cfg",
        /// `ph`: phase.
        pub phase: Option<ConfigPhase> = "ph" => Opt(enumeration::<ConfigPhase>()),
        /// `sc`: scope.
        pub scope: Option<ConfigScope> = "sc" => Opt(enumeration::<ConfigScope>()),
        /// `tid`: template id.
        pub template_id: String = "tid" => Text(limits::TEMPLATE_ID),
        /// `tv`: template version.
        pub template_version: String = "tv" => Text(limits::TEMPLATE_VERSION),
        /// `ts`: control-plane clock, Unix milliseconds.
        pub timestamp_ms: u64 = "ts" => uint::<u64>((0, u64::MAX)),
        /// `ap`: apply path relative to the root.
        pub apply_path: String = "ap" => Text(limits::APPLY_PATH),
        /// `pd`: digest of the canonical payload ([`crate::canonical`]).
        pub digest: String = "pd" => Text(limits::DIGEST),
        /// `alg`: signature algorithm (opaque).
        pub signature_alg: Option<String> = "alg" => Opt(Text(limits::SIGNATURE_ALG)),
        /// `sg`: signature (opaque).
        pub signature: Option<String> = "sg" => Opt(Text(limits::SIGNATURE)),
        /// `pm`: policy mode.
        pub policy_mode: Option<PolicyMode> = "pm" => Opt(enumeration::<PolicyMode>()),
        /// `cfg`: the payload, a JSON object (a CBOR map in native mode). Key order is not
        /// preserved; the digest is over the canonical form, which sorts keys itself.
        pub config: Value = "cfg" => JsonObject,
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `cv` with `k:"cfg"` (D → CP): outcome of `cc`.
    pub struct ConfigResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        const "k" = "cfg",
        /// `ph`: phase (echoed).
        pub phase: Option<ConfigPhase> = "ph" => Opt(enumeration::<ConfigPhase>()),
        /// `sc`: scope (echoed).
        pub scope: Option<ConfigScope> = "sc" => Opt(enumeration::<ConfigScope>()),
        /// `o`: applied.
        pub ok: bool = "o" => FLAG,
        /// `tid`: template id.
        pub template_id: String = "tid" => Text(limits::TEMPLATE_ID),
        /// `tv`: template version.
        pub template_version: String = "tv" => Text(limits::TEMPLATE_VERSION),
        /// `st`: applied or rejected.
        pub outcome: ConfigOutcome = "st" => enumeration::<ConfigOutcome>(),
        /// `pd`: digest the daemon computed.
        pub digest: String = "pd" => Text(limits::DIGEST),
        /// `at`: daemon clock when handled, Unix milliseconds.
        pub at_ms: u64 = "at" => uint::<u64>((0, u64::MAX)),
        /// `ap`: apply path.
        pub apply_path: Option<String> = "ap" => Opt(Text(limits::APPLY_PATH)),
        /// `vd`: violation codes, at most 32 (left out when empty).
        pub violations: Vec<String> = "vd" => List {
            max: limits::MAX_VIOLATIONS,
            item: Text(limits::VIOLATION),
            omit_empty: true,
        },
        /// `alg`: echoed.
        pub signature_alg: Option<String> = "alg" => Opt(Text(limits::SIGNATURE_ALG)),
        /// `sg`: echoed.
        pub signature: Option<String> = "sg" => Opt(Text(limits::SIGNATURE)),
        /// `pm`: echoed.
        pub policy_mode: Option<PolicyMode> = "pm" => Opt(enumeration::<PolicyMode>()),
        /// `m`: `config_applied`, `config_rejected`, …
        pub message: Option<String> = "m" => Opt(Text(limits::CONFIG_MESSAGE)),
    }
}

// ---------------------------------------------------------------------------------------------
// JIT kill switch
// ---------------------------------------------------------------------------------------------

wire_object! {
    /// `jk` (CP → D): revoke JIT credentials (by session, by reference, or all).
    pub struct JitKill {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `s`: only this session's credentials.
        pub session_id: Option<String> = "s" => Opt(Text(limits::SESSION_ID)),
        /// `r`: only this credential.
        pub credential_ref: Option<String> = "r" => Opt(Text(limits::CREDENTIAL_REF)),
        /// `x`: close the tunnel afterwards (always written, as 0.1.50 does).
        pub close_tunnel: bool = "x" => FLAG_ALWAYS,
        /// `m`: reason, ≤128.
        pub reason: Option<String> = "m" => Opt(Text(limits::KILL_REASON)),
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `jv` (D → CP): outcome of `jk`.
    pub struct JitKillResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: success.
        pub ok: bool = "o" => FLAG,
        /// `a`: number of credentials revoked.
        pub affected: u32 = "a" => uint::<u32>((0, u32::MAX as u64)),
        /// `m`: `daemon_not_ready`, `kill_switch_failed`.
        pub message: Option<String> = "m" => Opt(Text(limits::KILL_OUTCOME)),
    }
}

wire_object! {
    /// `jr` (CP → D, native only): renew a running session's JIT credential — move its expiry
    /// to `ttl_secs` from the daemon's now. The daemon only moves its own expiry timer: the
    /// environment of the running OpenCode keeps the value it started with (a process's
    /// environment cannot change from outside). 0.1.x daemons never get it: the control plane
    /// refuses to send it to a JSON peer. Answered by `ju` (or `e`).
    pub struct JitRenew {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `s`: the session (ours or OpenCode's id).
        pub session_id: String = "s" => Text(limits::SESSION_ID),
        /// `tl`: the new lifetime in seconds from now, 15..=3600 (as at the start).
        pub ttl_secs: u32 = "tl" => uint::<u32>((limits::MIN_JIT_TTL_SECS, limits::MAX_JIT_TTL_SECS)),
        /// `ik`: idempotency key. Native only, like the message.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `ju` (D → CP, native only): outcome of `jr`.
    pub struct JitRenewResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: success.
        pub ok: bool = "o" => FLAG,
        /// `e`: the new expiry, ms since the Unix epoch (when `o`).
        pub expires_at_ms: Option<u64> = "e" => Opt(uint::<u64>((0, u64::MAX))),
        /// `m`: why not: `session_not_found`, `session_ended`, `no_jit_credential`,
        /// `jit_revoked`, `jit_expired`, `invalid_ttl`, `renew_failed`, `opencode_not_enabled`.
        pub message: Option<String> = "m" => Opt(Text(limits::KILL_OUTCOME)),
    }
}

// ---------------------------------------------------------------------------------------------
// Git
// ---------------------------------------------------------------------------------------------

wire_object! {
    /// `gk` (CP → D): clone a repository.
    pub struct GitClone {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: target directory.
        pub path: String = "p" => TEXT_PATH,
        /// `u`: repository URL.
        pub url: String = "u" => Text(limits::GIT_URL),
        /// `b`: branch.
        pub branch: Option<String> = "b" => Opt(Text(limits::GIT_REF)),
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `ga` (CP → D): stage files.
    pub struct GitAdd {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: repository directory.
        pub path: String = "p" => TEXT_PATH,
        /// `f`: pathspec (default `.`).
        pub pathspec: Option<String> = "f" => Opt(Text(limits::GIT_PATHSPEC)),
        /// `A`: stage everything (`add -A`).
        pub all: bool = "A" => FLAG_IF_SET,
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `gp` (CP → D): commit.
    pub struct GitCommit {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: repository directory.
        pub path: String = "p" => TEXT_PATH,
        /// `m`: commit message.
        pub message: String = "m" => Text(limits::COMMIT_MESSAGE),
        /// `a`: amend.
        pub amend: bool = "a" => FLAG_IF_SET,
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `gh` (push) and `gm` (pull) (CP → D).
    pub struct GitSync {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: repository directory.
        pub path: String = "p" => TEXT_PATH,
        /// `o`: remote.
        pub remote: Option<String> = "o" => Opt(Text(limits::GIT_REMOTE)),
        /// `b`: branch.
        pub branch: Option<String> = "b" => Opt(Text(limits::GIT_REF)),
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `gc` (CP → D): list, create or delete branches.
    pub struct GitBranch {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: repository directory.
        pub path: String = "p" => TEXT_PATH,
        /// `a`: action (default list).
        pub action: Option<BranchAction> = "a" => Opt(enumeration::<BranchAction>()),
        /// `n`: branch name.
        pub name: Option<String> = "n" => Opt(Text(limits::GIT_REF)),
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `gx` (CP → D): check out a branch.
    pub struct GitCheckout {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: repository directory.
        pub path: String = "p" => TEXT_PATH,
        /// `b`: branch.
        pub branch: String = "b" => Text(limits::GIT_REF),
        /// `c`: create it (`checkout -b`).
        pub create: bool = "c" => FLAG_IF_SET,
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `gf` (CP → D): read or set the git identity.
    pub struct GitConfig {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `r`: root alias.
        pub root: String = "r" => TEXT_ROOT,
        /// `p`: repository directory.
        pub path: String = "p" => TEXT_PATH,
        /// `a`: get or set.
        pub action: GitConfigAction = "a" => enumeration::<GitConfigAction>(),
        /// `n`: `user.name`.
        pub name: Option<String> = "n" => Opt(Text(limits::GIT_IDENTITY)),
        /// `e`: `user.email`.
        pub email: Option<String> = "e" => Opt(Text(limits::GIT_IDENTITY)),
        /// `g`: global scope.
        pub global: bool = "g" => FLAG_IF_SET,
        /// `cm`: enable the credential manager.
        pub credential_manager: bool = "cm" => FLAG_IF_SET,
        /// `ik`: idempotency key. Native only. The daemon records the outcome under it and
        /// answers a re-send (after a reconnect, or a control-plane restart that reuses
        /// request ids) from the record instead of running the command twice.
        pub idempotency_key: Option<String> = "ik" => Opt(Text(limits::IDEMPOTENCY_KEY)); native,
    }
}

wire_object! {
    /// `gt` (D → CP): git status. Lists are present on success, `error` on failure.
    pub struct GitStatusResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: success.
        pub ok: bool = "o" => FLAG,
        /// `b`: branch line.
        pub branch: Option<String> = "b" => GIT_TEXT,
        /// `a`: added files.
        pub added: Option<Vec<String>> = "a" => GIT_LIST,
        /// `m`: modified files.
        pub modified: Option<Vec<String>> = "m" => GIT_LIST,
        /// `u`: untracked files.
        pub untracked: Option<Vec<String>> = "u" => GIT_LIST,
        /// `d`: deleted files.
        pub deleted: Option<Vec<String>> = "d" => GIT_LIST,
        /// `c`: never sent by 0.1.50; declared as a string in its contracts.
        pub conflict: Option<String> = "c" => GIT_TEXT,
        /// `e`: failure text.
        pub error: Option<String> = "e" => GIT_TEXT,
    }
}

wire_object! {
    /// The plain git outcome: `gj` (init), `gl` (clone), `gb` (add), `gd` (push), `gn` (pull),
    /// `gy` (checkout).
    pub struct GitResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: success.
        pub ok: bool = "o" => FLAG,
        /// `m`: git's output summary or the failure text.
        pub message: Option<String> = "m" => GIT_TEXT,
    }
}

wire_object! {
    /// `go` (D → CP): outcome of a commit.
    pub struct GitCommitResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: success.
        pub ok: bool = "o" => FLAG,
        /// `h`: short commit hash.
        pub hash: Option<String> = "h" => GIT_TEXT,
        /// `m`: summary or failure text.
        pub message: Option<String> = "m" => GIT_TEXT,
    }
}

wire_object! {
    /// `gu` (D → CP): outcome of a branch action.
    pub struct GitBranchResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: success.
        pub ok: bool = "o" => FLAG,
        /// `b`: branches (list action).
        pub branches: Option<Vec<String>> = "b" => GIT_LIST,
        /// `c`: current branch.
        pub current: Option<String> = "c" => GIT_TEXT,
        /// `m`: summary or failure text.
        pub message: Option<String> = "m" => GIT_TEXT,
    }
}

wire_object! {
    /// `gv` (D → CP): git identity.
    pub struct GitConfigResult {
        /// `i`.
        pub request_id: u32 = "i" => RequestId,
        /// `o`: success.
        pub ok: bool = "o" => FLAG,
        /// `n`: `user.name`.
        pub name: Option<String> = "n" => Opt(Text(limits::GIT_IDENTITY)),
        /// `e`: `user.email`.
        pub email: Option<String> = "e" => Opt(Text(limits::GIT_IDENTITY)),
        /// `h`: credential helper.
        pub helper: Option<String> = "h" => Opt(Text(limits::GIT_HELPER)),
        /// `a`: a credential helper is set (present on success).
        pub auth_ready: Option<bool> = "a" => Opt(FLAG),
        /// `m`: message.
        pub message: Option<String> = "m" => Opt(Text(limits::GIT_CONFIG_MESSAGE)),
    }
}

wire_object! {
    /// `gq` (D → CP): one live line of git output for request `request_id`.
    pub struct GitLog {
        /// `i`: the git request this belongs to.
        pub request_id: u32 = "i" => RequestId,
        /// `s`: stream.
        pub stream: GitLogStream = "s" => enumeration::<GitLogStream>(),
        /// `m`: the line, 1..500.
        pub line: String = "m" => Text(limits::GIT_LOG_LINE),
    }
}

// ---------------------------------------------------------------------------------------------
// The Message enum
// ---------------------------------------------------------------------------------------------

macro_rules! messages {
    (
        $(
            $(#[$vmeta:meta])*
            $variant:ident($ty:ty) = $tag:literal,
        )*
    ) => {
        /// Any v=1 message.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(clippy::large_enum_variant)]
        pub enum Message {
            $( $(#[$vmeta])* $variant($ty), )*
            /// `cv` with `k:"cfg"` (D → CP): outcome of a config push.
            ConfigResult(ConfigResult),
            /// `h1` with `v ≠ 1`: answer `UPDATE_REQUIRED`.
            HelloUnsupported(UnsupportedHello),
            /// A `t` this build does not know (with `v = 1`): answer `e PROTO` and carry on.
            Unknown {
                /// The type tag, 1..16 bytes, never a known one.
                t: String,
                /// `i`, if present and a valid uint32.
                request_id: Option<u32>,
            },
        }

        /// Which kind of message, without its fields. Tells the two `cv` shapes apart.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum MessageKind {
            $( $(#[$vmeta])* $variant, )*
            /// `cv` with `k:"cfg"`.
            ConfigResult,
            /// `h1` with `v ≠ 1`.
            HelloUnsupported,
            /// Unknown `t`.
            Unknown,
        }

        impl MessageKind {
            /// The wire tag (`"dr"`, …); `None` for [`MessageKind::Unknown`].
            pub fn tag(self) -> Option<&'static str> {
                match self {
                    $( MessageKind::$variant => Some($tag), )*
                    MessageKind::ConfigResult => Some("cv"),
                    MessageKind::HelloUnsupported => Some("h1"),
                    MessageKind::Unknown => None,
                }
            }
        }

        impl Message {
            /// Which kind of message this is.
            pub fn kind(&self) -> MessageKind {
                match self {
                    $( Message::$variant(_) => MessageKind::$variant, )*
                    Message::ConfigResult(_) => MessageKind::ConfigResult,
                    Message::HelloUnsupported(_) => MessageKind::HelloUnsupported,
                    Message::Unknown { .. } => MessageKind::Unknown,
                }
            }

            /// The wire `t`.
            pub fn type_tag(&self) -> &str {
                match self {
                    Message::Unknown { t, .. } => t,
                    other => other.kind().tag().unwrap_or(""),
                }
            }

            /// The envelope `i`, if the message has one.
            pub fn request_id(&self) -> Option<u32> {
                match self {
                    $( Message::$variant(m) => m.request_id(), )*
                    Message::ConfigResult(m) => m.request_id(),
                    Message::HelloUnsupported(_) => None,
                    Message::Unknown { request_id, .. } => *request_id,
                }
            }

            /// The message as a JSON (0.1.x) peer receives it: native-only fields at their
            /// defaults, 64-bit counts clamped to uint32. Equal to `self` when nothing is lost.
            pub fn to_compat(&self) -> Message {
                match self {
                    $( Message::$variant(m) => Message::$variant(m.to_compat()), )*
                    Message::ConfigResult(m) => Message::ConfigResult(m.to_compat()),
                    other => other.clone(),
                }
            }

            /// Checks every field before encoding.
            pub(crate) fn check(&self, codec: Codec) -> Result<(), EncodeError> {
                match self {
                    $( Message::$variant(m) => m.check_fields($tag, codec), )*
                    Message::ConfigResult(m) => m.check_fields("cv", codec),
                    Message::HelloUnsupported(h) => {
                        if h.version == PROTOCOL_VERSION {
                            return Err(EncodeError::Limit { t: "h1", key: "v", why: "must not be 1" });
                        }
                        Ok(())
                    }
                    Message::Unknown { t, .. } => {
                        let known = lookup_tag(t).is_some() || t == "cv" || t == "h1";
                        if known || TYPE_TAG.check(t).is_err() {
                            return Err(EncodeError::Limit { t: "?", key: "t", why: "not a valid unknown tag" });
                        }
                        Ok(())
                    }
                }
            }

            /// Writes the frame.
            pub(crate) fn write<S: Sink>(&self, s: &mut S) {
                match self {
                    $(
                        Message::$variant(m) => {
                            s.begin_frame(PROTOCOL_VERSION, $tag, m.field_count(S::CODEC));
                            m.write_fields(s);
                        }
                    )*
                    Message::ConfigResult(m) => {
                        s.begin_frame(PROTOCOL_VERSION, "cv", m.field_count(S::CODEC));
                        m.write_fields(s);
                    }
                    Message::HelloUnsupported(h) => s.begin_frame(h.version, "h1", 0),
                    Message::Unknown { t, request_id } => {
                        s.begin_frame(PROTOCOL_VERSION, t, usize::from(request_id.is_some()));
                        if let Some(id) = request_id {
                            s.key("i");
                            s.uint(u64::from(*id));
                        }
                    }
                }
                s.end_frame();
            }
        }

        /// The static tag and a reader for a known `t` (the `cfg` shape of `cv` aside).
        #[allow(clippy::type_complexity)]
        fn lookup_tag(t: &str) -> Option<(&'static str, fn(&Fields<'_>) -> Result<Message, DecodeError>)> {
            match t {
                $( $tag => Some(($tag, |f| <$ty>::read_fields(f).map(Message::$variant))), )*
                _ => None,
            }
        }
    };
}

messages! {
    /// `h1` (D → CP): handshake init.
    Hello(Hello) = "h1",
    /// `h2` (CP → D): handshake acknowledgement.
    HelloAck(HelloAck) = "h2",
    /// `e` (both): error.
    Error(ErrorFrame) = "e",
    /// `p` (D → CP): telemetry.
    Telemetry(Telemetry) = "p",
    /// `pl` (D → CP): exposed ports.
    PortList(PortList) = "pl",
    /// `dr` (CP → D): list a directory.
    DirList(DirList) = "dr",
    /// `ds` (D → CP): directory listing.
    DirListing(DirListing) = "ds",
    /// `md` (CP → D): make a directory (with parents).
    MakeDir(PathRequest) = "md",
    /// `mr` (D → CP): outcome of `md`.
    MakeDirResult(FsResult) = "mr",
    /// `rd` (CP → D): remove a directory.
    RemoveDir(RemoveDir) = "rd",
    /// `rr` (D → CP): outcome of `rd`.
    RemoveDirResult(FsResult) = "rr",
    /// `rn` (CP → D): rename.
    Rename(Rename) = "rn",
    /// `rp` (D → CP): outcome of `rn`.
    RenameResult(FsResult) = "rp",
    /// `si` (CP → D): start a session.
    StartSession(StartSession) = "si",
    /// `sr` (D → CP): outcome of `si`/`st`.
    SessionResult(SessionResult) = "sr",
    /// `st` (CP → D): stop a session.
    StopSession(StopSession) = "st",
    /// `sq` (CP → D): session status query.
    SessionStatusQuery(SessionStatusQuery) = "sq",
    /// `sv` (D → CP): session status.
    SessionStatus(SessionStatus) = "sv",
    /// `sl` (CP → D): replay the session log.
    ReplayLog(ReplayLog) = "sl",
    /// `sc` (D → CP): stream chunk.
    StreamChunk(StreamChunk) = "sc",
    /// `sa` (CP → D): stream chunk ack.
    StreamAck(StreamAck) = "sa",
    /// `sp` (CP → D): prompt.
    Prompt(Prompt) = "sp",
    /// `pr` (CP → D): proxy request.
    ProxyRequest(ProxyRequest) = "pr",
    /// `pv` (D → CP): proxy response.
    ProxyResponse(ProxyResponse) = "pv",
    /// `ps` (D → CP): proxy stream chunk.
    ProxyChunk(ProxyChunk) = "ps",
    /// `pe` (D → CP): proxy stream end; (CP → D, native only): stop streaming it.
    ProxyEnd(RequestOnly) = "pe",
    /// `pw` (CP → D, native only): proxy stream credit.
    ProxyWindow(ProxyWindow) = "pw",
    /// `cf` (CP → D): setup status query.
    SetupStatusQuery(RequestOnly) = "cf",
    /// `cg` (D → CP): setup status.
    SetupStatus(SetupStatus) = "cg",
    /// `cu` (CP → D): setup save.
    SetupSave(SetupSave) = "cu",
    /// `cv` without `k:"cfg"` (D → CP): outcome of `cu`.
    SetupSaveResult(SetupSaveResult) = "cv",
    /// `cc` (CP → D): config push.
    ConfigPush(ConfigPush) = "cc",
    /// `jk` (CP → D): JIT kill switch.
    JitKill(JitKill) = "jk",
    /// `jv` (D → CP): outcome of `jk`.
    JitKillResult(JitKillResult) = "jv",
    /// `jr` (CP → D, native only): renew a session's JIT credential.
    JitRenew(JitRenew) = "jr",
    /// `ju` (D → CP, native only): outcome of `jr`.
    JitRenewResult(JitRenewResult) = "ju",
    /// `gs` (CP → D): git status.
    GitStatus(PathRequest) = "gs",
    /// `gt` (D → CP): git status result.
    GitStatusResult(GitStatusResult) = "gt",
    /// `gi` (CP → D): git init.
    GitInit(PathRequest) = "gi",
    /// `gj` (D → CP): outcome of `gi`.
    GitInitResult(GitResult) = "gj",
    /// `gk` (CP → D): git clone.
    GitClone(GitClone) = "gk",
    /// `gl` (D → CP): outcome of `gk`.
    GitCloneResult(GitResult) = "gl",
    /// `ga` (CP → D): git add.
    GitAdd(GitAdd) = "ga",
    /// `gb` (D → CP): outcome of `ga`.
    GitAddResult(GitResult) = "gb",
    /// `gp` (CP → D): git commit.
    GitCommit(GitCommit) = "gp",
    /// `go` (D → CP): outcome of `gp`.
    GitCommitResult(GitCommitResult) = "go",
    /// `gh` (CP → D): git push.
    GitPush(GitSync) = "gh",
    /// `gd` (D → CP): outcome of `gh`.
    GitPushResult(GitResult) = "gd",
    /// `gm` (CP → D): git pull.
    GitPull(GitSync) = "gm",
    /// `gn` (D → CP): outcome of `gm`.
    GitPullResult(GitResult) = "gn",
    /// `gc` (CP → D): git branch.
    GitBranch(GitBranch) = "gc",
    /// `gu` (D → CP): outcome of `gc`.
    GitBranchResult(GitBranchResult) = "gu",
    /// `gx` (CP → D): git checkout.
    GitCheckout(GitCheckout) = "gx",
    /// `gy` (D → CP): outcome of `gx`.
    GitCheckoutResult(GitResult) = "gy",
    /// `gf` (CP → D): git config.
    GitConfig(GitConfig) = "gf",
    /// `gv` (D → CP): outcome of `gf`.
    GitConfigResult(GitConfigResult) = "gv",
    /// `gq` (D → CP): live git output.
    GitLog(GitLog) = "gq",
}

/// Rule for the `t` of an unknown message.
const TYPE_TAG: TextLimit = TextLimit::new(1, limits::MAX_TYPE_TAG_BYTES).bytes();

impl Message {
    /// Decodes one frame (see [`crate::codec::decode`]).
    pub fn decode(bytes: &[u8], codec: Codec) -> Result<Message, DecodeError> {
        crate::codec::decode(bytes, codec)
    }

    /// Encodes this message as one frame (see [`crate::codec::encode`]).
    pub fn encode(&self, codec: Codec) -> Result<Vec<u8>, EncodeError> {
        crate::codec::encode(self, codec)
    }

    /// An `e` frame.
    pub fn error(code: ErrorCode, request_id: Option<u32>, message: Option<&str>) -> Message {
        Message::Error(ErrorFrame {
            request_id,
            code,
            message: message.map(str::to_owned),
        })
    }

    /// The kind of reply a request expects, `None` for anything that is not a request
    /// (or, like `sp`, expects none). `sl` is answered by a stream of `sc` keyed by stream id.
    pub fn expected_reply(&self) -> Option<MessageKind> {
        Some(match self {
            Message::Hello(_) => MessageKind::HelloAck,
            Message::DirList(_) => MessageKind::DirListing,
            Message::StartSession(_) | Message::StopSession(_) => MessageKind::SessionResult,
            Message::SessionStatusQuery(_) => MessageKind::SessionStatus,
            Message::SetupStatusQuery(_) => MessageKind::SetupStatus,
            Message::SetupSave(_) => MessageKind::SetupSaveResult,
            Message::ConfigPush(_) => MessageKind::ConfigResult,
            Message::JitKill(_) => MessageKind::JitKillResult,
            Message::JitRenew(_) => MessageKind::JitRenewResult,
            Message::MakeDir(_) => MessageKind::MakeDirResult,
            Message::RemoveDir(_) => MessageKind::RemoveDirResult,
            Message::Rename(_) => MessageKind::RenameResult,
            Message::GitStatus(_) => MessageKind::GitStatusResult,
            Message::GitInit(_) => MessageKind::GitInitResult,
            Message::GitClone(_) => MessageKind::GitCloneResult,
            Message::GitAdd(_) => MessageKind::GitAddResult,
            Message::GitCommit(_) => MessageKind::GitCommitResult,
            Message::GitPush(_) => MessageKind::GitPushResult,
            Message::GitPull(_) => MessageKind::GitPullResult,
            Message::GitBranch(_) => MessageKind::GitBranchResult,
            Message::GitCheckout(_) => MessageKind::GitCheckoutResult,
            Message::GitConfig(_) => MessageKind::GitConfigResult,
            Message::ProxyRequest(_) => MessageKind::ProxyResponse,
            Message::ReplayLog(_) => MessageKind::StreamChunk,
            _ => return None,
        })
    }
    /// True for messages only native (CBOR) peers exchange (`pw`, `jr`, `ju`): a 0.1.x JSON
    /// peer would not know them, so they are never sent to one.
    pub fn is_native_only(&self) -> bool {
        matches!(
            self,
            Message::ProxyWindow(_) | Message::JitRenew(_) | Message::JitRenewResult(_)
        )
    }

    /// The native idempotency key (`ik`) of a mutating request, if it carries one.
    pub fn idempotency_key(&self) -> Option<&str> {
        match self {
            Message::MakeDir(m) => m.idempotency_key.as_deref(),
            Message::GitStatus(m) => m.idempotency_key.as_deref(),
            Message::GitInit(m) => m.idempotency_key.as_deref(),
            Message::RemoveDir(m) => m.idempotency_key.as_deref(),
            Message::Rename(m) => m.idempotency_key.as_deref(),
            Message::StartSession(m) => m.idempotency_key.as_deref(),
            Message::StopSession(m) => m.idempotency_key.as_deref(),
            Message::Prompt(m) => m.idempotency_key.as_deref(),
            Message::SetupSave(m) => m.idempotency_key.as_deref(),
            Message::ConfigPush(m) => m.idempotency_key.as_deref(),
            Message::JitKill(m) => m.idempotency_key.as_deref(),
            Message::JitRenew(m) => m.idempotency_key.as_deref(),
            Message::GitClone(m) => m.idempotency_key.as_deref(),
            Message::GitAdd(m) => m.idempotency_key.as_deref(),
            Message::GitCommit(m) => m.idempotency_key.as_deref(),
            Message::GitPush(m) => m.idempotency_key.as_deref(),
            Message::GitPull(m) => m.idempotency_key.as_deref(),
            Message::GitBranch(m) => m.idempotency_key.as_deref(),
            Message::GitCheckout(m) => m.idempotency_key.as_deref(),
            Message::GitConfig(m) => m.idempotency_key.as_deref(),
            _ => None,
        }
    }

    /// Sets the native idempotency key (`ik`) on a request that can carry one. Returns `false`
    /// (and changes nothing) for messages that have no `ik` field.
    pub fn set_idempotency_key(&mut self, key: Option<String>) -> bool {
        match self {
            Message::MakeDir(m) => m.idempotency_key = key,
            Message::GitStatus(m) => m.idempotency_key = key,
            Message::GitInit(m) => m.idempotency_key = key,
            Message::RemoveDir(m) => m.idempotency_key = key,
            Message::Rename(m) => m.idempotency_key = key,
            Message::StartSession(m) => m.idempotency_key = key,
            Message::StopSession(m) => m.idempotency_key = key,
            Message::Prompt(m) => m.idempotency_key = key,
            Message::SetupSave(m) => m.idempotency_key = key,
            Message::ConfigPush(m) => m.idempotency_key = key,
            Message::JitKill(m) => m.idempotency_key = key,
            Message::JitRenew(m) => m.idempotency_key = key,
            Message::GitClone(m) => m.idempotency_key = key,
            Message::GitAdd(m) => m.idempotency_key = key,
            Message::GitCommit(m) => m.idempotency_key = key,
            Message::GitPush(m) => m.idempotency_key = key,
            Message::GitPull(m) => m.idempotency_key = key,
            Message::GitBranch(m) => m.idempotency_key = key,
            Message::GitCheckout(m) => m.idempotency_key = key,
            Message::GitConfig(m) => m.idempotency_key = key,
            _ => return false,
        }
        true
    }

    /// The wire tag of [`Message::expected_reply`] (`"cv"` for both `cu` and `cc`).
    pub fn expected_reply_tag(&self) -> Option<&'static str> {
        self.expected_reply().and_then(MessageKind::tag)
    }

    /// True if `reply` settles this request: the same request id and either the expected kind
    /// or an `e` (which fails the request), as 0.1.50's control plane correlates. Always false
    /// for `sl`, whose `sc` chunks carry the stream id instead of `i`.
    pub fn is_answered_by(&self, reply: &Message) -> bool {
        let (Some(id), Some(kind)) = (self.request_id(), self.expected_reply()) else {
            return false;
        };
        reply.request_id() == Some(id)
            && (reply.kind() == kind || reply.kind() == MessageKind::Error)
    }

    /// Builds a message from the entries of a decoded frame.
    pub(crate) fn from_entries(
        entries: Vec<(&str, Val<'_>)>,
        codec: Codec,
    ) -> Result<Message, DecodeError> {
        check_keys(&entries)?;
        let get = |key: &str| entries.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let t = get("t")
            .ok_or(DecodeError::BadType)?
            .text(&TYPE_TAG)
            .map_err(|_| DecodeError::BadType)?;
        let version = get("v")
            .ok_or(DecodeError::BadVersion)?
            .uint()
            .map_err(|_| DecodeError::BadVersion)?;
        if version != PROTOCOL_VERSION {
            if t == "h1" {
                return Ok(Message::HelloUnsupported(UnsupportedHello { version }));
            }
            return Err(DecodeError::UnsupportedVersion {
                t: t.to_owned(),
                v: version,
            });
        }
        if t == "cv" {
            let kind = match get("k") {
                None => "setup",
                Some(k) => k.text(&TextLimit::new(0, 16)).unwrap_or(""),
            };
            match kind {
                "setup" => {}
                "cfg" => {
                    let fields = Fields::new("cv", codec, entries)?;
                    return ConfigResult::read_fields(&fields).map(Message::ConfigResult);
                }
                _ => {
                    return Err(DecodeError::BadField {
                        t: "cv",
                        key: "k",
                        why: "must be \"setup\" or \"cfg\"",
                    });
                }
            }
        }
        match lookup_tag(t) {
            Some((tag, read)) => read(&Fields::new(tag, codec, entries)?),
            None => Ok(Message::Unknown {
                t: t.to_owned(),
                request_id: get("i")
                    .and_then(|v| v.uint().ok())
                    .and_then(|n| u32::try_from(n).ok()),
            }),
        }
    }
}
