//! Validation of every piece of wire input that ends up in a git argv.
//!
//! The rule is that user text never becomes an option, and never names something git would
//! treat as more than data. Each check here says what it refuses and why; the refusal text
//! goes back to the operator in the reply's `m` (or `e` for status), so it says what to send
//! instead. The argv builders in the parent module add a second layer (`--` before paths,
//! `--end-of-options` before revisions, `--opt=value` single elements), so a gap here still
//! cannot turn input into an option; these checks exist so that such input is refused with a
//! clear reason before git ever starts.

use std::path::{Component, Path, PathBuf};

use crate::guard::path::{GuardError, RelPath, RootDir};

use super::text::shown_input;

/// A refusal of wire input, with the operator-facing reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse(what: &str, value: &str, why: &str) -> Refused {
    Refused(format!("refused {what} `{}`: {why}", shown_input(value)))
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A branch (or other ref) name, by the rules of `git check-ref-format --branch`, plus: no
/// leading `+` (force in a refspec) and no `HEAD`. Any other ref-like name a user might check
/// out (`origin/feature`, a tag, an abbreviated hash) passes.
pub fn check_branch(what: &str, name: &str) -> Result<(), Refused> {
    let bad = |why: &str| Err(refuse(what, name, why));
    if name.is_empty() {
        return bad("it is empty — send a branch name");
    }
    if name.starts_with('-') {
        return bad(
            "it starts with '-', which git would read as an option — branch names start with a letter or digit",
        );
    }
    if name.starts_with('+') {
        return bad("a leading '+' means \"force\" in a refspec — send the plain branch name");
    }
    if name == "HEAD" || name == "@" {
        return bad("it names HEAD itself, not a branch");
    }
    if has_control(name) {
        return bad("it contains a control character (newline, tab, …)");
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return Err(refuse(
            what,
            name,
            &format!("git ref names cannot contain {c:?} (see `git help check-ref-format`)"),
        ));
    }
    if name.contains("..") || name.contains("@{") || name.contains("//") {
        return bad("git ref names cannot contain `..`, `@{` or `//`");
    }
    if name.starts_with('/') || name.ends_with('/') || name.ends_with('.') {
        return bad("git ref names cannot start or end with '/' or end with '.'");
    }
    if name
        .split('/')
        .any(|c| c.starts_with('.') || c.ends_with(".lock"))
    {
        return bad("no part of a git ref name may start with '.' or end with `.lock`");
    }
    Ok(())
}

/// A remote **name** as configured in the repository (`origin`, `upstream`, `my-fork`): letters,
/// digits, `.`, `_` and `-`, not starting with `-` or `.`. URLs and paths are refused here: a
/// push or pull goes to a remote the repository already has, so the clone URL policy cannot be
/// side-stepped through `o`.
pub fn check_remote(name: &str) -> Result<(), Refused> {
    let bad = |why: &str| Err(refuse("remote", name, why));
    if name.is_empty() {
        return bad("it is empty — send a remote name such as `origin`");
    }
    if name.starts_with('-') {
        return bad("it starts with '-', which git would read as an option");
    }
    if name.contains("://") || name.contains(['/', ':', '@']) {
        return bad(
            "push and pull go to a remote configured in the repository, by name — not to a URL or path; add the remote first (`git remote add NAME URL`)",
        );
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return bad("remote names here are letters, digits, '.', '_' and '-'");
    }
    if name.starts_with('.') || name.contains("..") || name.ends_with(".lock") {
        return bad("a remote name cannot start with '.', contain `..` or end with `.lock`");
    }
    Ok(())
}

/// `ga.f`: one path, relative to the repository directory `p`, given to git after `--` with
/// literal pathspecs. Returns the normalised path (`.` for the directory itself).
///
/// Refused: pathspec magic (`:(top)…`, `:!…`: a leading `:`), a leading `-`, control
/// characters, absolute paths and `..` that climbs out of `p` (the path guard's rules).
pub fn check_pathspec(spec: &str) -> Result<String, Refused> {
    let bad = |why: &str| Err(refuse("path", spec, why));
    if spec.starts_with(':') {
        return bad(
            "pathspec magic (`:(top)`, `:!`, `:/`, …) is not accepted — send a plain path relative to the repository directory",
        );
    }
    if spec.starts_with('-') {
        return bad("it starts with '-', which git would read as an option");
    }
    if has_control(spec) {
        return bad("it contains a control character (newline, tab, …)");
    }
    match RelPath::parse(spec) {
        Ok(rel) if rel.is_root() => Ok(".".to_owned()),
        Ok(rel) => Ok(rel.components().collect::<Vec<_>>().join("/")),
        Err(GuardError::Escape { .. }) => bad(
            "it climbs out of the repository directory with `..` — send a path inside it (or point `p` at a higher directory)",
        ),
        Err(e) => Err(refuse("path", spec, &e.to_string())),
    }
}

/// `gf.n`: a `user.name`: trimmed by the caller; no control characters (a newline would
/// start a second config line in git's eyes, and break commit headers), no `<`/`>` (they
/// delimit the e-mail in a commit header), no leading `-`.
pub fn check_identity_name(name: &str) -> Result<(), Refused> {
    let bad = |why: &str| Err(refuse("user.name", name, why));
    if has_control(name) {
        return bad("it contains a control character (newline, tab, …)");
    }
    if name.contains(['<', '>']) {
        return bad("it contains '<' or '>', which delimit the e-mail in a commit");
    }
    if name.starts_with('-') {
        return bad("it starts with '-'");
    }
    Ok(())
}

/// `gf.e`: a `user.email`: 0.1.50's shape (`^[^\s@]+@[^\s@]+\.[^\s@]+$`, failing with
/// `invalid_email_format`), plus no control characters, `<`/`>` or leading `-`.
pub fn check_identity_email(email: &str) -> Result<(), Refused> {
    let shape_ok = match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.contains('@')
                && domain
                    .rsplit_once('.')
                    .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        }
        None => false,
    };
    let clean = !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && !email.contains(['<', '>'])
        && !email.starts_with('-');
    if shape_ok && clean {
        Ok(())
    } else {
        Err(Refused("invalid_email_format".to_owned()))
    }
}

/// How git may reach a repository: what the daemon's operator allows. Enforced twice: here for
/// clone URLs (a clear refusal before git starts) and by the `protocol.*.allow` settings of
/// the hardening prefix for every transport git opens (remotes of push and pull included).
///
/// The sandbox decides reachability too: landlock lets git connect only to
/// `process.connect_ports` (default 443), so `http://` on port 80 or ssh on 22 also needs
/// those ports there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPolicy {
    /// `http://` (no TLS): allowed with a warning line unless turned off.
    pub allow_http: bool,
    /// `ssh://`, `git+ssh://` and scp-like `user@host:path`. Off by default: ssh needs keys
    /// in the session's private home and a `known_hosts`, which an operator sets up on purpose.
    pub allow_ssh: bool,
}

impl Default for UrlPolicy {
    fn default() -> UrlPolicy {
        UrlPolicy {
            allow_http: true,
            allow_ssh: false,
        }
    }
}

/// Where a clone comes from, once validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneSource {
    /// A network URL, passed to git as given (after trimming).
    Remote {
        url: String,
        /// Plain-text transport: the reply and the log say so.
        insecure: bool,
    },
    /// A repository beneath the same root, checked through the path guard. `host_path` is
    /// what git is given (the root's configured path joined with `rel`).
    Local { rel: RelPath, host_path: PathBuf },
}

/// `gk.u`: classify and check a clone URL (already trimmed and non-empty).
///
/// - `https://` always; `http://` when [`UrlPolicy::allow_http`] (with a warning);
///   `ssh://`, `git+ssh://`, `ssh+git://` and scp-like `[user@]host:path` when
///   [`UrlPolicy::allow_ssh`]. Hosts may not start with `-`.
/// - Local repositories: a path relative to the root, an absolute path beneath the root's
///   configured path, or `file://` with such a path; each must be an existing directory
///   reached through the path guard (so symlinks cannot lead out).
/// - Everything else is refused: remote-helper syntax (`ext::…` runs a command, `fd::…`),
///   `git://` (unauthenticated, unencrypted), other schemes, a leading `-`, control
///   characters or whitespace.
pub fn classify_clone_url(
    url: &str,
    root: &RootDir,
    policy: &UrlPolicy,
) -> Result<CloneSource, Refused> {
    let bad = |why: &str| Err(refuse("repository URL", url, why));
    if url.starts_with('-') {
        return bad("it starts with '-', which git would read as an option");
    }
    if has_control(url) {
        return bad("it contains a control character (newline, tab, …)");
    }
    if let Some((scheme, rest)) = split_scheme(url, "://") {
        return match scheme.to_ascii_lowercase().as_str() {
            "https" => remote_url(url, rest, false),
            "http" if policy.allow_http => remote_url(url, rest, true),
            "http" => bad("plain http:// is turned off on this host — use https://"),
            "ssh" | "git+ssh" | "ssh+git" if policy.allow_ssh => remote_url(url, rest, false),
            "ssh" | "git+ssh" | "ssh+git" => bad(
                "ssh URLs are turned off on this host — use https://, or ask the operator to allow ssh",
            ),
            "file" => {
                let path = rest.strip_prefix("localhost").unwrap_or(rest);
                if !path.starts_with('/') {
                    return bad("file:// URLs must name an absolute path (file:///…)");
                }
                local_source(url, path, root)
            }
            "git" => bad("git:// is unauthenticated and unencrypted — use https://"),
            _ => bad(
                "only https:// (and, where allowed, http:// and ssh://) URLs or repositories inside the root can be cloned",
            ),
        };
    }
    if split_scheme(url, "::").is_some() {
        return bad(
            "remote-helper URLs (`ext::`, `fd::`, `<transport>::…`) are refused: they run programs or reach file descriptors",
        );
    }
    if is_scp_like(url) {
        if !policy.allow_ssh {
            return bad(
                "`host:path` is an ssh address, and ssh is turned off on this host — use https://",
            );
        }
        let host = url.split(':').next().unwrap_or_default();
        let host = host.rsplit('@').next().unwrap_or_default();
        if host.is_empty() || host.starts_with('-') {
            return bad("the host part is empty or starts with '-'");
        }
        if url.chars().any(char::is_whitespace) {
            return bad("it contains whitespace");
        }
        return Ok(CloneSource::Remote {
            url: url.to_owned(),
            insecure: false,
        });
    }
    if url.starts_with('/') {
        local_source(url, url, root)
    } else {
        local_rel(url, root)
    }
}

/// `scheme` + `sep` at the start of `url`, where scheme is git's `[A-Za-z][A-Za-z0-9+.-]*`.
fn split_scheme<'a>(url: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    let end = url.find(sep)?;
    let scheme = &url[..end];
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'));
    (first_ok && rest_ok).then(|| (scheme, &url[end + sep.len()..]))
}

/// git's own rule (`url_is_local_not_ssh`): a `:` with no `/` before it is an ssh address.
fn is_scp_like(url: &str) -> bool {
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon < slash,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

fn remote_url(url: &str, rest: &str, insecure: bool) -> Result<CloneSource, Refused> {
    let bad = |why: &str| Err(refuse("repository URL", url, why));
    if url.chars().any(char::is_whitespace) {
        return bad("it contains whitespace");
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return bad("it has no host");
    }
    if host.starts_with('-') {
        return bad("the host starts with '-', which ssh would read as an option");
    }
    Ok(CloneSource::Remote {
        url: url.to_owned(),
        insecure,
    })
}

/// An absolute host path (from a plain path or a `file://` URL) that must lie beneath the
/// root's configured path.
fn local_source(url: &str, abs: &str, root: &RootDir) -> Result<CloneSource, Refused> {
    let abs_path = Path::new(abs);
    let mut inside = abs_path.components();
    for root_comp in root.path().components() {
        if inside.next() != Some(root_comp) {
            return Err(refuse(
                "repository URL",
                url,
                "local repositories can only be cloned from inside the root — send a path relative to the root",
            ));
        }
    }
    let mut rel = String::new();
    for c in inside {
        let s = match c {
            Component::Normal(s) => s.to_str().unwrap_or("\u{fffd}"),
            Component::CurDir => ".",
            Component::ParentDir => "..",
            Component::RootDir | Component::Prefix(_) => continue,
        };
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(s);
    }
    local_rel_checked(url, &rel, root)
}

fn local_rel(url: &str, root: &RootDir) -> Result<CloneSource, Refused> {
    local_rel_checked(url, url, root)
}

fn local_rel_checked(url: &str, rel: &str, root: &RootDir) -> Result<CloneSource, Refused> {
    let rel = RelPath::parse(rel).map_err(|e| refuse("repository URL", url, &e.to_string()))?;
    // Through the guard: exists, is a directory, and no symlink on the way leads out.
    root.open_dir(&rel)
        .map_err(|e| refuse("repository URL", url, &e.to_string()))?;
    let mut host_path = root.path().to_path_buf();
    for c in rel.components() {
        host_path.push(c);
    }
    Ok(CloneSource::Local { rel, host_path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names() {
        for ok in [
            "main",
            "feature/x",
            "release-1.2",
            "origin/main",
            "1a2b3c4",
            "a+b",
            "ünï",
        ] {
            assert_eq!(check_branch("branch", ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "--upload-pack=touch /tmp/x",
            "+main",
            "HEAD",
            "@",
            "a b",
            "a\nb",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[",
            "a\\b",
            "a..b",
            "a@{1}",
            "a//b",
            "/a",
            "a/",
            "a.",
            ".a",
            "a/.b",
            "a.lock",
            "a.lock/b",
            "a\u{7f}",
        ] {
            assert!(check_branch("branch", bad).is_err(), "{bad:?}");
        }
        let why = check_branch("branch", "--upload-pack=x").unwrap_err().0;
        assert!(why.contains("starts with '-'"), "{why}");
    }

    #[test]
    fn remote_names() {
        for ok in ["origin", "up-stream", "my_fork.2"] {
            assert_eq!(check_remote(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-c",
            "-c core.sshCommand=touch x",
            "--upload-pack=x",
            "https://h/r",
            "../r",
            "/abs",
            "host:path",
            "a b",
            ".hidden",
            "a..b",
            "a.lock",
            "a\nb",
        ] {
            assert!(check_remote(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pathspecs() {
        assert_eq!(check_pathspec("src/main.rs"), Ok("src/main.rs".to_owned()));
        assert_eq!(check_pathspec("."), Ok(".".to_owned()));
        assert_eq!(check_pathspec("a/../b"), Ok("b".to_owned()));
        assert_eq!(check_pathspec("*.rs"), Ok("*.rs".to_owned()));
        for bad in [":(top)../x", ":!x", ":/", "../x", "/etc", "-A", "a\nb"] {
            assert!(check_pathspec(bad).is_err(), "{bad:?}");
        }
        assert!(check_pathspec(":(top)x").unwrap_err().0.contains("magic"));
    }

    #[test]
    fn identities() {
        assert_eq!(check_identity_name("Ada Lovelace"), Ok(()));
        for bad in ["a\nb", "a<b>", "-x", "a\tb"] {
            assert!(check_identity_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_identity_email("a@b.c"), Ok(()));
        for bad in [
            "a", "a@b", "@b.c", "a@.c", "a@b.", "a b@c.d", "a@b.c\n", "a@b@c.d", "<a@b.c>",
            "-a@b.c",
        ] {
            assert_eq!(
                check_identity_email(bad),
                Err(Refused("invalid_email_format".to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn url_shapes() {
        assert_eq!(split_scheme("https://h/x", "://"), Some(("https", "h/x")));
        assert_eq!(split_scheme("ext::sh -c x", "::"), Some(("ext", "sh -c x")));
        assert_eq!(split_scheme("a b::x", "::"), None);
        assert_eq!(split_scheme("1x::y", "::"), None);
        assert!(is_scp_like("git@github.com:o/r.git"));
        assert!(is_scp_like("host:r"));
        assert!(!is_scp_like("dir/a:b"));
        assert!(!is_scp_like("plain"));
    }
}
