//! Directory entries through `getdents64(2)`, not libc's `readdir`.
//!
//! Why: on 32-bit glibc targets (armv7 Raspberry Pi userlands) `readdir` is the non-LFS variant,
//! and it fails with `EOVERFLOW` as soon as a filesystem hands out a 64-bit inode number or
//! directory cookie — ext4's hashed directories do, and so does any 64-bit host filesystem seen
//! through qemu-user. `getdents64` is the same system call with the same 64-bit record layout on
//! every Linux architecture and libc, so one small reader serves all of them.
//!
//! The reader takes an owned fd of a directory opened for reading (`O_RDONLY | O_DIRECTORY`),
//! which the path guard produced, so it never resolves a path itself.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::dir::Type;
use nix::errno::Errno;

/// Bytes read per `getdents64` call.
const BUF_LEN: usize = 16 * 1024;
/// Offsets in `struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }`.
const RECLEN_AT: usize = 16;
const TYPE_AT: usize = 18;
const NAME_AT: usize = 19;

/// One entry: its name and, when the filesystem reports it, its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    name: CString,
    kind: Option<Type>,
}

impl DirEntry {
    /// The entry's name (never contains `/` or NUL; may be `.` or `..`).
    pub fn file_name(&self) -> &CStr {
        &self.name
    }

    /// The type from `d_type`; `None` for `DT_UNKNOWN` (ask `fstatat`).
    pub fn file_type(&self) -> Option<Type> {
        self.kind
    }
}

/// Iterator over a directory's entries, in the filesystem's order.
pub struct DirReader {
    fd: OwnedFd,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    done: bool,
}

impl DirReader {
    /// Reads from `fd`, a directory opened for reading.
    pub fn new(fd: OwnedFd) -> DirReader {
        DirReader {
            fd,
            buf: vec![0; BUF_LEN],
            pos: 0,
            len: 0,
            done: false,
        }
    }

    fn fill(&mut self) -> Result<(), Errno> {
        // SAFETY: getdents64 writes at most `buf.len()` bytes into our buffer and returns how
        // many it wrote, or -1 with errno set.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr(),
                self.buf.len(),
            )
        };
        if n < 0 {
            return Err(Errno::last());
        }
        self.len = usize::try_from(n).map_err(|_| Errno::EOVERFLOW)?;
        self.pos = 0;
        if self.len == 0 {
            self.done = true;
        }
        Ok(())
    }

    fn parse_at(&mut self) -> Result<DirEntry, Errno> {
        let rec = &self.buf[self.pos..self.len];
        if rec.len() < NAME_AT {
            return Err(Errno::EIO);
        }
        let reclen = usize::from(u16::from_ne_bytes([rec[RECLEN_AT], rec[RECLEN_AT + 1]]));
        if reclen < NAME_AT || reclen > rec.len() {
            return Err(Errno::EIO);
        }
        let name_bytes = &rec[NAME_AT..reclen];
        let name_len = name_bytes.iter().position(|&b| b == 0).ok_or(Errno::EIO)?;
        let name = CString::new(&name_bytes[..name_len]).map_err(|_| Errno::EIO)?;
        let kind = match rec[TYPE_AT] {
            libc::DT_DIR => Some(Type::Directory),
            libc::DT_REG => Some(Type::File),
            libc::DT_LNK => Some(Type::Symlink),
            libc::DT_FIFO => Some(Type::Fifo),
            libc::DT_CHR => Some(Type::CharacterDevice),
            libc::DT_BLK => Some(Type::BlockDevice),
            libc::DT_SOCK => Some(Type::Socket),
            _ => None,
        };
        self.pos += reclen;
        Ok(DirEntry { name, kind })
    }
}

impl Iterator for DirReader {
    type Item = Result<DirEntry, Errno>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.pos >= self.len {
            if let Err(e) = self.fill() {
                self.done = true;
                return Some(Err(e));
            }
            if self.done {
                return None;
            }
        }
        let entry = self.parse_at();
        if entry.is_err() {
            self.done = true;
        }
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt as _;

    fn open_dir(p: &std::path::Path) -> OwnedFd {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        nix::fcntl::open(
            c.as_c_str(),
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap()
    }

    #[test]
    fn lists_every_entry_with_its_type_across_many_buffers() {
        let dir = tempfile::tempdir().unwrap();
        // Enough long names to need several getdents64 calls.
        for i in 0..600 {
            std::fs::write(
                dir.path().join(format!("file-{i:04}-{}", "x".repeat(60))),
                b"",
            )
            .unwrap();
        }
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("sub", dir.path().join("link")).unwrap();
        let mut names = Vec::new();
        for e in DirReader::new(open_dir(dir.path())) {
            let e = e.unwrap();
            let n = e.file_name().to_str().unwrap().to_owned();
            match n.as_str() {
                "." | ".." => assert_eq!(e.file_type(), Some(Type::Directory)),
                "sub" => assert_eq!(e.file_type(), Some(Type::Directory)),
                "link" => assert_eq!(e.file_type(), Some(Type::Symlink)),
                _ => assert_eq!(e.file_type(), Some(Type::File), "{n}"),
            }
            names.push(n);
        }
        names.sort();
        assert_eq!(names.len(), 600 + 2 + 2);
        names.dedup();
        assert_eq!(names.len(), 604, "no entry twice");
    }

    #[test]
    fn reading_a_non_directory_fd_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let fd: OwnedFd = std::fs::File::open(&f).unwrap().into();
        let mut r = DirReader::new(fd);
        assert_eq!(r.next(), Some(Err(Errno::ENOTDIR)));
        assert_eq!(r.next(), None);
    }
}
