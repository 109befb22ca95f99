//! Validation of user-supplied git URLs before anything connects.

use gix::url::Scheme;

use super::GitError;

/// How a validated URL is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Http,
    Ssh,
}

/// A URL accepted by [`parse`].
#[derive(Debug, Clone)]
pub(crate) struct RemoteUrl {
    pub(crate) url: gix::url::Url,
    pub(crate) transport: Transport,
    /// The URL as given (it never holds a password: those are refused).
    pub(crate) display: String,
}

/// Accept `https://`, `http://`, `ssh://` and scp-like `[user@]host:path`
/// URLs; refuse everything else (local paths, `file://`, `git://`, remote
/// helpers such as `ext::`), passwords embedded in the URL (they belong in a
/// Secret), and user or host names that an ssh command line could take for an
/// option.
pub(crate) fn parse(input: &str) -> Result<RemoteUrl, GitError> {
    let shown = redact(input);
    let invalid = |why: &str| GitError::InvalidUrl(format!("{shown:?}: {why}"));
    if input.is_empty() {
        return Err(GitError::InvalidUrl("the URL is empty".into()));
    }
    if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("contains whitespace or control characters"));
    }
    let explicit_scheme = match input.split_once("://") {
        Some((scheme, _)) => {
            let scheme = scheme.to_ascii_lowercase();
            if !matches!(scheme.as_str(), "https" | "http" | "ssh") {
                return Err(invalid(&format!(
                    "unsupported scheme {scheme:?}: use https://, http://, ssh:// or user@host:path"
                )));
            }
            true
        }
        None => {
            // scp-like: `[user@]host:path`, where the host part has no `/`.
            let Some((host_part, path)) = input.split_once(':') else {
                return Err(invalid(
                    "not a remote URL: use https://, http://, ssh:// or user@host:path",
                ));
            };
            if host_part.is_empty()
                || host_part.contains('/')
                || path.is_empty()
                || input.contains("::")
            {
                return Err(invalid(
                    "not a remote URL: use https://, http://, ssh:// or user@host:path",
                ));
            }
            false
        }
    };
    // gix only knows lower-case schemes.
    let normalized = match input.split_once("://") {
        Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
        None => input.to_owned(),
    };
    let url = gix::url::parse(normalized.as_bytes()).map_err(|e| invalid(&e.to_string()))?;
    let transport = match url.scheme {
        Scheme::Http | Scheme::Https if explicit_scheme => Transport::Http,
        Scheme::Ssh => Transport::Ssh,
        _ => {
            return Err(invalid(
                "unsupported transport: use https://, http://, ssh:// or user@host:path",
            ));
        }
    };
    if url.password().is_some() {
        return Err(invalid(
            "the URL embeds a password; reference a Secret with the credentials instead",
        ));
    }
    let host = url.host().unwrap_or_default();
    if host.is_empty() {
        return Err(invalid("the URL has no host"));
    }
    if host.starts_with('-') || url.user().is_some_and(|u| u.starts_with('-')) {
        return Err(invalid("a user or host name may not start with '-'"));
    }
    if url.path.is_empty() || url.path == "/" {
        return Err(invalid("the URL has no repository path"));
    }
    Ok(RemoteUrl {
        url,
        transport,
        display: input.to_owned(),
    })
}

/// The value of kpack's `kpack.io/git` annotation for credentials of this
/// repository: `https://host[:port]` (or `http://`) for HTTP, `user@host`
/// for ssh (kpack matches credentials to a repository by it). `None` for a
/// URL that [`parse`] refuses.
pub fn kpack_git_annotation(input: &str) -> Option<String> {
    let remote = parse(input).ok()?;
    let url = &remote.url;
    let host = url.host()?;
    Some(match remote.transport {
        Transport::Http => match url.port {
            Some(port) => format!("{}://{host}:{port}", url.scheme.as_str()),
            None => format!("{}://{host}", url.scheme.as_str()),
        },
        Transport::Ssh => format!("{}@{host}", url.user().unwrap_or("git")),
    })
}

/// The URL with the password of an `scheme://user:password@host` URL masked,
/// for messages about URLs that were refused.
pub(crate) fn redact(input: &str) -> String {
    let Some((scheme, rest)) = input.split_once("://") else {
        return input.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:[REDACTED]@{host}{tail}"),
            None => input.to_owned(),
        },
        None => input.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        for (input, transport, host, path) in [
            (
                "https://github.com/acme/shop.git",
                Transport::Http,
                "github.com",
                "/acme/shop.git",
            ),
            (
                "HTTPS://github.com/acme/shop",
                Transport::Http,
                "github.com",
                "/acme/shop",
            ),
            (
                "http://127.0.0.1:8080/shop.git",
                Transport::Http,
                "127.0.0.1",
                "/shop.git",
            ),
            (
                "ssh://git@github.com/acme/shop.git",
                Transport::Ssh,
                "github.com",
                "/acme/shop.git",
            ),
            (
                "ssh://git@example.com:2222/srv/shop.git",
                Transport::Ssh,
                "example.com",
                "/srv/shop.git",
            ),
            (
                "git@github.com:acme/shop.git",
                Transport::Ssh,
                "github.com",
                "acme/shop.git",
            ),
            (
                "gitlab.example.com:group/shop.git",
                Transport::Ssh,
                "gitlab.example.com",
                "group/shop.git",
            ),
            (
                "https://token@github.com/acme/shop.git",
                Transport::Http,
                "github.com",
                "/acme/shop.git",
            ),
        ] {
            let url = parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(url.transport, transport, "{input}");
            assert_eq!(url.url.host(), Some(host), "{input}");
            assert_eq!(url.url.path, path, "{input}");
            assert_eq!(url.display, input);
        }
        assert_eq!(
            parse("ssh://git@example.com:2222/srv/shop.git")
                .unwrap()
                .url
                .port,
            Some(2222)
        );
        assert_eq!(
            parse("git@github.com:acme/shop.git").unwrap().url.user(),
            Some("git")
        );
    }

    #[test]
    fn refused_forms() {
        for input in [
            "",
            "/srv/git/shop.git",
            "./shop.git",
            "shop.git",
            "file:///srv/git/shop.git",
            "git://github.com/acme/shop.git",
            "ftp://example.com/shop.git",
            "ext::sh -c touch% /tmp/pwned",
            "ext::ssh",
            "https://github.com/acme/shop .git",
            "https://github.com/acme/\nshop.git",
            "https:///acme/shop.git",
            "https://github.com",
            "https://github.com/",
            "ssh://-oProxyCommand=touch%20x/shop.git",
            "ssh://-oProxyCommand=x@host/shop.git",
            "-oProxyCommand=x:shop.git",
            "git@github.com:",
        ] {
            match parse(input) {
                Err(GitError::InvalidUrl(_)) => {}
                other => panic!("{input:?} should be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn embedded_password_is_refused_and_not_echoed() {
        let err = parse("https://alice:hunter2secret@github.com/acme/shop.git").unwrap_err();
        assert!(matches!(err, GitError::InvalidUrl(_)));
        assert!(!err.to_string().contains("hunter2secret"), "{err}");
        assert!(!format!("{err:?}").contains("hunter2secret"), "{err:?}");
        assert!(err.to_string().contains("Secret"), "{err}");
        let err = parse("ftp://alice:hunter2secret@example.com/x").unwrap_err();
        assert!(!err.to_string().contains("hunter2secret"), "{err}");
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact("https://alice:pw@github.com/a.git"),
            "https://alice:[REDACTED]@github.com/a.git"
        );
        assert_eq!(
            redact("https://github.com/a.git"),
            "https://github.com/a.git"
        );
        assert_eq!(redact("git@github.com:a.git"), "git@github.com:a.git");
    }

    #[test]
    fn kpack_git_annotation_names_scheme_and_host() {
        assert_eq!(
            kpack_git_annotation("https://git.example.com/acme/shop.git").as_deref(),
            Some("https://git.example.com")
        );
        assert_eq!(
            kpack_git_annotation("http://127.0.0.1:8080/shop.git").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            kpack_git_annotation("git@github.com:acme/shop.git").as_deref(),
            Some("git@github.com")
        );
        assert_eq!(
            kpack_git_annotation("ssh://deploy@git.example.com:2222/shop.git").as_deref(),
            Some("deploy@git.example.com")
        );
        assert_eq!(kpack_git_annotation("file:///tmp/x"), None);
    }
}
