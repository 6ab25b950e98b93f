//! `fs`: the directory operations behind `dr`, `md`, `rd` and `rn`, on top of [`crate::guard::path`].
//!
//! Each operation takes a [`RootDir`] and wire strings, resolves through the guard, and then
//! works only with `*at` system calls relative to the fds the guard returned. Results are
//! typed values; the dispatcher turns them into protocol replies and [`GuardError::wire_code`]
//! into `e` frames. Every call is blocking file-system work: run it off the async executor
//! (`smol::unblock`). [`RootDir`] is `Send + Sync`, so one set of roots serves all requests.
//!
//! Choices that differ from CodeMantle 0.1.50, and why:
//!
//! - **Listings are sorted by name bytes and paged.** 0.1.50 returned the first `l` entries in
//!   OS order and ignored the cursor, so directories over 256 entries were truncated. Here the
//!   order is stable and the cursor (opaque to callers; it encodes the last name returned)
//!   resumes strictly after it, so pages have no duplicates or gaps even if entries are added
//!   or removed between pages (added ones appear if they sort after the cursor). Each page
//!   reads the whole directory but keeps only `limit` names in memory. The cursor always fits
//!   the wire's 128-character `k` field (see [`Cursor`] for how names over 95 bytes are
//!   encoded, and the one rare case where that can repeat entries).
//! - **mtime is in seconds** since the epoch, clamped to `u32`. 0.1.50 sent milliseconds, which
//!   always clamped to `u32::MAX`, i.e. carried no information.
//! - **Sizes are real** (`st_size`) for files; directories report 0, as in 0.1.50.
//! - **Symlinks, sockets, fifos and devices are skipped**, as in 0.1.50 (counted in
//!   [`Listing::skipped_other`]).
//! - **Names that are not UTF-8 are skipped** and counted ([`Listing::skipped_non_utf8`]): wire
//!   names are JSON/CBOR text strings, so such a name could be shown lossily but never sent
//!   back to address the file; a listing that offers a name which then fails is worse than one
//!   that says "2 entries not shown".
//! - **mkdir** creates only the last component (the parent must exist), is idempotent on an
//!   existing directory and fails on anything else.
//! - **rmdir** refuses the root itself (0.1.50 would remove an empty root). Recursive removal
//!   walks by fd, unlinks symlinks without following them, and does not cross mount points.
//! - **rename** does not overwrite unless asked (0.1.50 always overwrote), via
//!   `renameat2(RENAME_NOREPLACE)`, so the check and the rename are one atomic step.

use std::collections::BinaryHeap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nix::dir::Type;

use crate::guard::dirents::DirReader;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use crate::guard::path::{GuardError, RelPath, RootDir, lossy, name_cstr};

/// Largest page a listing returns (the 0.1.x `dr.l` maximum).
pub const MAX_LIST_LIMIT: usize = 256;

/// Deepest directory nesting a recursive remove descends into. Each level holds one fd, so
/// this also bounds the fds one removal can use.
pub const MAX_REMOVE_DEPTH: usize = 256;

/// Directory entries read per batch while emptying a directory.
const REMOVE_BATCH: usize = 512;

/// What kind of entry a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
}

/// One listed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub name: String,
    /// Bytes for files; 0 for directories.
    pub size: u64,
    /// Modification time, seconds since the Unix epoch, clamped to `0..=u32::MAX`.
    pub mtime_s: u32,
}

/// One page of a directory listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Entries in ascending name-byte order.
    pub entries: Vec<Entry>,
    /// Pass back as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
    /// Entries in the whole directory skipped because their name is not UTF-8.
    pub skipped_non_utf8: u32,
    /// Entries in the whole directory skipped because they are symlinks, sockets, fifos or
    /// devices.
    pub skipped_other: u32,
}

/// Outcome of [`make_dir`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MakeDir {
    Created,
    AlreadyExisted,
}

/// List the directory `path` beneath `root`: at most `limit` entries (clamped to
/// `1..=`[`MAX_LIST_LIMIT`]) whose names sort after `cursor`.
pub fn list_dir(
    root: &RootDir,
    path: &str,
    limit: usize,
    cursor: Option<&str>,
) -> Result<Listing, GuardError> {
    let rel = RelPath::parse(path)?;
    let limit = limit.clamp(1, MAX_LIST_LIMIT);
    let after = cursor.map(Cursor::decode).transpose()?;

    let fd = root.open_dir(&rel)?;
    let stat_fd = fd.try_clone().map_err(|e| io_error("dup", &rel, &e))?;
    let mut dir = DirReader::new(fd);

    let mut listing = Listing::default();
    // Max-heap of the smallest `limit` candidate names seen so far.
    let mut page: BinaryHeap<Vec<u8>> = BinaryHeap::with_capacity(limit + 1);
    let mut more = false;
    let mut undecided: Vec<Vec<u8>> = Vec::new();
    for entry in dir.by_ref() {
        let entry = entry.map_err(|e| GuardError::from_errno("readdir", &rel.to_string(), e))?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if std::str::from_utf8(name).is_err() {
            listing.skipped_non_utf8 = listing.skipped_non_utf8.saturating_add(1);
            continue;
        }
        let listable = match entry.file_type() {
            Some(Type::Directory | Type::File) => true,
            Some(_) => false,
            // DT_UNKNOWN (some filesystems): ask.
            None => match stat_entry(stat_fd.as_fd(), entry.file_name()) {
                Ok(st) => kind_of(&st).is_some(),
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(GuardError::from_errno("stat", &lossy(name), e)),
            },
        };
        if !listable {
            listing.skipped_other = listing.skipped_other.saturating_add(1);
            continue;
        }
        match after.as_ref().map(|c| c.position(name)) {
            None | Some(Position::After) => offer(&mut page, &mut more, limit, name.to_vec()),
            Some(Position::AtOrBefore) => {}
            Some(Position::Undecided) => undecided.push(name.to_vec()),
        }
    }
    drop(dir);
    if let Some(Cursor::Hashed { hash, .. }) = &after {
        // Names sharing the cursor's 87-byte prefix: resume after the one whose hash matches.
        // If it was removed since, the whole group is offered again (duplicates, never gaps).
        undecided.sort();
        let start = undecided
            .iter()
            .position(|n| &name_hash(n) == hash)
            .map_or(0, |i| i + 1);
        for name in undecided.drain(start..) {
            offer(&mut page, &mut more, limit, name);
        }
    }

    let names = page.into_sorted_vec();
    if more {
        listing.next_cursor = names.last().map(|n| Cursor::encode(n));
    }
    for name in names {
        let cname = name_cstr(&name)?;
        let st = match stat_entry(stat_fd.as_fd(), &cname) {
            Ok(st) => st,
            // Removed since readdir: leave it out; the cursor still advances past it.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(GuardError::from_errno("stat", &lossy(&name), e)),
        };
        // Re-checked on the stat result: the entry may have been swapped for a symlink.
        let Some(kind) = kind_of(&st) else { continue };
        let Ok(name) = String::from_utf8(name) else {
            continue;
        };
        listing.entries.push(Entry {
            kind,
            name,
            size: match kind {
                EntryKind::Dir => 0,
                EntryKind::File => u64::try_from(st.st_size).unwrap_or(0),
            },
            mtime_s: clamp_mtime(st.st_mtime),
        });
    }
    Ok(listing)
}

/// Keep `name` if it is among the smallest `limit` offered so far.
fn offer(page: &mut BinaryHeap<Vec<u8>>, more: &mut bool, limit: usize, name: Vec<u8>) {
    if page.len() < limit {
        page.push(name);
    } else {
        *more = true;
        if page.peek().is_some_and(|largest| name < *largest) {
            page.pop();
            page.push(name);
        }
    }
}

/// Longest name (bytes) a cursor carries verbatim: `"n"` + base64url of 95 bytes = 128 chars.
const CURSOR_EXACT_MAX: usize = 95;
/// Prefix kept of a longer name: `"h"` + base64url(87 + 8 bytes) = 128 chars.
const CURSOR_PREFIX: usize = 87;
/// Longest cursor emitted, in characters (the protocol's `k` limit).
pub const MAX_CURSOR_CHARS: usize = 128;

/// The listing cursor: the position after the last name returned.
///
/// A name of up to 95 bytes is carried verbatim (`n` + base64url). A longer one (names may be
/// 255 bytes, which would need 340 characters) is carried as its first 87 bytes plus 8 bytes
/// of its SHA-256 (`h` + base64url): names sorting after the prefix group are after the cursor,
/// and inside the group (names starting with those 87 bytes) the hash finds the exact name. If
/// that name was removed between pages, its group is listed again from its start.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor {
    Exact(Vec<u8>),
    Hashed { prefix: Vec<u8>, hash: [u8; 8] },
}

enum Position {
    AtOrBefore,
    After,
    /// In the hashed cursor's prefix group; decided once the whole group is known.
    Undecided,
}

fn name_hash(name: &[u8]) -> [u8; 8] {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(name);
    let mut h = [0u8; 8];
    h.copy_from_slice(&digest[..8]);
    h
}

impl Cursor {
    fn encode(name: &[u8]) -> String {
        if name.len() <= CURSOR_EXACT_MAX {
            format!("n{}", URL_SAFE_NO_PAD.encode(name))
        } else {
            let mut raw = name[..CURSOR_PREFIX].to_vec();
            raw.extend_from_slice(&name_hash(name));
            format!("h{}", URL_SAFE_NO_PAD.encode(raw))
        }
    }

    fn decode(cursor: &str) -> Result<Cursor, GuardError> {
        let bad = || GuardError::InvalidArgument {
            what: "listing cursor is not one this daemon issued — list again without a cursor"
                .to_owned(),
        };
        if cursor.len() > MAX_CURSOR_CHARS {
            return Err(bad());
        }
        let (kind, body) = cursor.split_at_checked(1).ok_or_else(bad)?;
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad())?;
        match kind {
            "n" if !raw.is_empty() && raw.len() <= CURSOR_EXACT_MAX => Ok(Cursor::Exact(raw)),
            "h" if raw.len() == CURSOR_PREFIX + 8 => {
                let (prefix, hash) = raw.split_at(CURSOR_PREFIX);
                let mut h = [0u8; 8];
                h.copy_from_slice(hash);
                Ok(Cursor::Hashed {
                    prefix: prefix.to_vec(),
                    hash: h,
                })
            }
            _ => Err(bad()),
        }
    }

    fn position(&self, name: &[u8]) -> Position {
        match self {
            Cursor::Exact(last) if name <= last.as_slice() => Position::AtOrBefore,
            Cursor::Exact(_) => Position::After,
            Cursor::Hashed { prefix, .. } => {
                // The cursor's name is longer than `prefix` and starts with it.
                if name.len() > prefix.len() && name.starts_with(prefix) {
                    Position::Undecided
                } else if name <= prefix.as_slice() {
                    Position::AtOrBefore
                } else {
                    Position::After
                }
            }
        }
    }
}

fn stat_entry(dir: BorrowedFd<'_>, name: &CStr) -> Result<FileStat, Errno> {
    nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn kind_of(st: &FileStat) -> Option<EntryKind> {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFDIR => Some(EntryKind::Dir),
        SFlag::S_IFREG => Some(EntryKind::File),
        _ => None,
    }
}

fn is_dir(st: &FileStat) -> bool {
    kind_of(st) == Some(EntryKind::Dir)
}

/// Seconds since the epoch as `u32`: before 1970 is 0, after 2106 is `u32::MAX`.
#[allow(clippy::useless_conversion)] // time_t is i32 on some 32-bit targets
fn clamp_mtime(mtime: libc::time_t) -> u32 {
    let t = i64::from(mtime);
    u32::try_from(t.max(0)).unwrap_or(u32::MAX)
}

fn io_error(op: &'static str, rel: &RelPath, e: &std::io::Error) -> GuardError {
    GuardError::from_errno(
        op,
        &rel.to_string(),
        Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    )
}

/// Create the directory `path`. Its parent must exist. An existing directory is success
/// ([`MakeDir::AlreadyExisted`]); an existing file, symlink or other entry is
/// [`GuardError::AlreadyExists`]. The root itself "already exists".
pub fn make_dir(root: &RootDir, path: &str) -> Result<MakeDir, GuardError> {
    let rel = RelPath::parse(path)?;
    if rel.is_root() {
        return Ok(MakeDir::AlreadyExisted);
    }
    let (parent, name) = root.open_parent(&rel)?;
    let cname = name_cstr(name.as_bytes())?;
    // 0o777 & !umask, like mkdir(1): the operator's umask is the policy for new directories.
    match nix::sys::stat::mkdirat(&parent, cname.as_c_str(), Mode::from_bits_truncate(0o777)) {
        Ok(()) => Ok(MakeDir::Created),
        Err(Errno::EEXIST) => match stat_entry(parent.as_fd(), &cname) {
            Ok(st) if is_dir(&st) => Ok(MakeDir::AlreadyExisted),
            _ => Err(GuardError::AlreadyExists {
                path: rel.to_string(),
            }),
        },
        Err(e) => Err(GuardError::from_errno("mkdir", &rel.to_string(), e)),
    }
}

/// Remove the directory `path`. Non-recursive: it must be empty. Recursive: its contents are
/// removed first, walking by fd; symlinks inside are unlinked, never followed; a mount point
/// inside stops the removal with [`GuardError::OtherFilesystem`]. The root itself is refused.
pub fn remove_dir(root: &RootDir, path: &str, recursive: bool) -> Result<(), GuardError> {
    let rel = RelPath::parse(path)?;
    if rel.is_root() {
        return Err(GuardError::IsRoot { op: "remove" });
    }
    let (parent, name) = root.open_parent(&rel)?;
    let cname = name_cstr(name.as_bytes())?;
    let shown = rel.to_string();
    if recursive {
        let parent_dev = nix::sys::stat::fstat(&parent)
            .map_err(|e| GuardError::from_errno("stat", &shown, e))?
            .st_dev;
        remove_tree(parent.as_fd(), &cname, &shown, parent_dev, 0)
    } else {
        rmdir_at(parent.as_fd(), &cname, &shown)
    }
}

fn rmdir_at(parent: BorrowedFd<'_>, name: &CStr, shown: &str) -> Result<(), GuardError> {
    nix::unistd::unlinkat(parent, name, UnlinkatFlags::RemoveDir).map_err(|e| match e {
        // Linux reports a non-empty directory as ENOTEMPTY, some filesystems as EEXIST.
        Errno::EEXIST => GuardError::NotEmpty {
            path: shown.to_owned(),
        },
        e => GuardError::from_errno("rmdir", shown, e),
    })
}

/// Remove directory `name` in `parent` and everything beneath it.
fn remove_tree(
    parent: BorrowedFd<'_>,
    name: &CStr,
    shown: &str,
    dev: libc::dev_t,
    depth: usize,
) -> Result<(), GuardError> {
    if depth >= MAX_REMOVE_DEPTH {
        return Err(GuardError::TooDeep {
            path: shown.to_owned(),
            max: MAX_REMOVE_DEPTH,
        });
    }
    // O_NOFOLLOW|O_DIRECTORY: a symlink here (even one swapped in just now) fails to open as
    // a directory, so we never descend through one.
    let fd = nix::fcntl::openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP => GuardError::NotADirectory {
            path: shown.to_owned(),
        },
        e => GuardError::from_errno("open", shown, e),
    })?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| GuardError::from_errno("stat", shown, e))?;
    if st.st_dev != dev {
        return Err(GuardError::OtherFilesystem {
            path: shown.to_owned(),
        });
    }
    empty_dir(&fd, shown, dev, depth)?;
    rmdir_at(parent, name, shown)
}

/// Remove every entry of the open directory `dir`.
fn empty_dir(dir: &OwnedFd, shown: &str, dev: libc::dev_t, depth: usize) -> Result<(), GuardError> {
    loop {
        // Read a batch of names, then act on it: unlinking while readdir is in progress may
        // skip entries, so each batch starts from a fresh open of ".".
        let batch = read_names(dir, shown)?;
        if batch.is_empty() {
            return Ok(());
        }
        for name in batch {
            let child_shown = format!("{shown}/{}", lossy(name.as_bytes()));
            match nix::unistd::unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                // Linux: unlink(2) of a directory is EISDIR (POSIX allows EPERM).
                Err(Errno::EISDIR | Errno::EPERM) => {
                    remove_tree(dir.as_fd(), &name, &child_shown, dev, depth + 1)?;
                }
                Err(e) => return Err(GuardError::from_errno("unlink", &child_shown, e)),
            }
        }
    }
}

fn read_names(dir: &OwnedFd, shown: &str) -> Result<Vec<CString>, GuardError> {
    let fd = nix::fcntl::openat(
        dir,
        c".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| GuardError::from_errno("opendir", shown, e))?;
    let mut names = Vec::new();
    for entry in DirReader::new(fd) {
        let entry = entry.map_err(|e| GuardError::from_errno("readdir", shown, e))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        names.push(name.to_owned());
        if names.len() >= REMOVE_BATCH {
            break;
        }
    }
    Ok(names)
}

/// Rename `src` to `dst` within one root. Both parents are resolved through the guard; the last
/// components are not followed (a symlink is moved, not its target). Without `overwrite`, an
/// existing `dst` is [`GuardError::AlreadyExists`] and nothing changes (atomically, via
/// `RENAME_NOREPLACE`); with it, `dst` is replaced as by rename(2).
pub fn rename(root: &RootDir, src: &str, dst: &str, overwrite: bool) -> Result<(), GuardError> {
    let src = RelPath::parse(src)?;
    let dst = RelPath::parse(dst)?;
    if src.is_root() || dst.is_root() {
        return Err(GuardError::IsRoot { op: "rename" });
    }
    if dst.starts_with(&src) && dst != src {
        return Err(GuardError::InvalidArgument {
            what: format!("cannot move `{src}` inside itself (to `{dst}`)"),
        });
    }
    let (src_parent, src_name) = root.open_parent(&src)?;
    let (dst_parent, dst_name) = root.open_parent(&dst)?;
    let src_c = name_cstr(src_name.as_bytes())?;
    let dst_c = name_cstr(dst_name.as_bytes())?;
    let flags = if overwrite { 0 } else { libc::RENAME_NOREPLACE };
    renameat2(src_parent.as_fd(), &src_c, dst_parent.as_fd(), &dst_c, flags).map_err(|e| match e {
        // Both parents were just opened, so a missing entry is the source.
        Errno::ENOENT => GuardError::NotFound {
            path: src.to_string(),
        },
        Errno::EINVAL => GuardError::InvalidArgument {
            what: format!(
                "cannot rename `{src}` to `{dst}`: a directory cannot move inside itself, or this filesystem does not support rename without overwrite"
            ),
        },
        e => GuardError::from_errno("rename", &dst.to_string(), e),
    })
}

/// `renameat2(2)` by raw syscall: nix only wraps it for glibc, and we also build for musl.
fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
    flags: libc::c_uint,
) -> Result<(), Errno> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: both names are valid NUL-terminated strings and both fds are open for the
        // duration of the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                old_dir.as_raw_fd(),
                old.as_ptr(),
                new_dir.as_raw_fd(),
                new.as_ptr(),
                flags,
            )
        };
        if ret == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codemantle_protocol::error::ErrorCode;

    #[test]
    fn mtime_clamps() {
        assert_eq!(clamp_mtime(-5), 0);
        assert_eq!(clamp_mtime(1_700_000_000), 1_700_000_000);
        #[cfg(target_pointer_width = "64")]
        assert_eq!(clamp_mtime(10_000_000_000), u32::MAX);
    }

    #[test]
    fn cursor_round_trip_and_rejects_garbage() {
        let c = Cursor::encode(b"name.txt");
        assert_eq!(
            Cursor::decode(&c).unwrap(),
            Cursor::Exact(b"name.txt".to_vec())
        );
        for bad in ["!!", "", "n", "x", "nAA!", &"n".repeat(200)] {
            assert_eq!(
                Cursor::decode(bad).unwrap_err().wire_code(),
                ErrorCode::Path,
                "{bad}"
            );
        }
    }

    #[test]
    fn cursor_always_fits_the_wire() {
        for len in [1, 94, 95, 96, 200, 255] {
            let name = vec![b'x'; len];
            let c = Cursor::encode(&name);
            assert!(c.len() <= MAX_CURSOR_CHARS, "{len}: {}", c.len());
            match Cursor::decode(&c).unwrap() {
                Cursor::Exact(n) => assert_eq!(n, name),
                Cursor::Hashed { prefix, hash } => {
                    assert!(len > CURSOR_EXACT_MAX);
                    assert_eq!(prefix, &name[..CURSOR_PREFIX]);
                    assert_eq!(hash, name_hash(&name));
                }
            }
        }
    }
}
