//! Listing a remote's branches over smart HTTP on the operator's own runtime.
//!
//! A first poll of an `http(s)://` repository is two requests at most: the
//! ref advertisement (`GET info/refs?service=git-upload-pack`, asking for
//! protocol v2) and, when the server speaks v2, an `ls-refs` command for
//! `refs/heads/` (`POST git-upload-pack`). Later polls of a v2 server send
//! the command alone ([`V2Servers`]). Both are made with the shared,
//! pinned, redirect-free client of [`remote`](super::remote) and awaited on
//! the runtime; each response is read chunk by chunk through the listing's
//! byte [`Budget`], and only then parsed, in memory, by gix's own pkt-line
//! reader and ref parsers (v0/v1 advertisements and v2 `ls-refs` answers).
//! Nothing of a listing runs on tokio's blocking pool: handing every HTTP
//! step from a blocking thread to the runtime and back was most of an idle
//! operator's CPU at 1,000 Projects (docs/benchmarks.md).
//!
//! The rules are those of every exchange with a remote: the host's
//! addresses are checked against the host policy before anything connects;
//! no redirect is followed; basic credentials are sent only after the
//! server asks for them, and only to the URL's own origin; a server's
//! response body is never quoted, only its protocol error line (bounded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use gix::{
    error::ErrorExt,
    protocol::{
        handshake::{Ref, refs},
        transport::{
            Protocol,
            client::{Capabilities, capabilities::blocking_recv::Handshake},
            packetline::{
                PacketLineRef,
                blocking_io::{StreamingPeekableIter, encode},
            },
        },
    },
};

use super::{
    GitCredentials, GitError,
    error::bounded,
    hosts::allowed_addresses_async,
    limits::Budget,
    remote::{ListOptions, MAX_PART_CHARS, Origin, RemoteHeads, classify, heads_of, shared_client},
    url::RemoteUrl,
};

/// The content types of the two answers a listing reads.
const ADVERTISEMENT: &str = "application/x-git-upload-pack-advertisement";
const RESULT: &str = "application/x-git-upload-pack-result";

/// List the branches of the `http(s)://` repository `remote` (already parsed
/// and checked against `credentials`), within `options` and `budget`. The
/// caller bounds the time ([`Budget`] counts the bytes only here).
pub(super) async fn list(
    remote: &RemoteUrl,
    credentials: Option<&GitCredentials>,
    options: &ListOptions,
    budget: &Arc<Budget>,
) -> Result<RemoteHeads, GitError> {
    let host = remote.url.host().unwrap_or_default().to_ascii_lowercase();
    let port = remote
        .url
        .port_or_default()
        .ok_or_else(|| GitError::InvalidUrl(format!("{}: no port", remote.display)))?;
    let addresses = allowed_addresses_async(&host, port, &options.hosts)
        .await
        .map_err(|e| e.prefixed(&remote.display))?;
    let origin = Origin::of(&remote.url);
    let mut exchange = Exchange {
        client: shared_client(&origin, &addresses, options.timeout)?,
        origin,
        remote,
        basic: match credentials {
            Some(GitCredentials::Basic { username, password }) => {
                Some((username.as_str(), password.as_str()))
            }
            _ => None,
        },
        asked_for_credentials: false,
        budget,
        timeout: options.timeout,
    };

    let servers = &options.v2_servers;
    if let Some(command) = servers.command(&remote.display) {
        match exchange.ls_refs(command).await {
            Ok(refs) => return heads_of(refs, remote, options.max_refs),
            // Whatever went wrong (the server no longer speaks v2, wants
            // another object format, refuses or is gone), the listing starts
            // over as a first one would, and says what that finds.
            Err(_) => servers.forget(&remote.display),
        }
    }

    let advertised = exchange
        .request(
            reqwest::Method::GET,
            "info/refs?service=git-upload-pack",
            None,
        )
        .await?;
    let refs = match advertisement(&advertised).map_err(|e| exchange.failed(&e))? {
        Advertised::Refs(refs) => refs,
        Advertised::V2(capabilities) => {
            drop(advertised);
            if !capabilities.contains("ls-refs") {
                return Err(GitError::Unreachable(format!(
                    "{}: the server speaks git protocol v2 without the ls-refs command",
                    remote.display
                )));
            }
            let command = Bytes::from(ls_refs_command(&capabilities).map_err(|e| {
                GitError::Internal(format!("cannot write the ls-refs command: {e}"))
            })?);
            let refs = exchange.ls_refs(command.clone()).await?;
            servers.remember(&remote.display, command);
            refs
        }
    };
    heads_of(refs, remote, options.max_refs)
}

/// The most repositories [`V2Servers`] keeps a command for; when it is
/// full, it starts again from nothing (each repository then costs one
/// advertisement more).
const MAX_V2_SERVERS: usize = 10_000;

/// What earlier polls learnt of the protocol-v2 servers they reached: for
/// each repository URL (as given), the `ls-refs` command its server's
/// capabilities called for. Protocol v2 over HTTP is stateless, every
/// command a request of its own, so a later poll sends the command at once
/// and skips the advertisement: one request instead of two, which at 1,000
/// Projects polled every minute is most of what an idle operator does. If
/// that request fails in any way, the URL is forgotten and the same poll
/// starts over with the advertisement: a server that no longer speaks v2,
/// or changed its object format, is listed as on a first poll.
///
/// Only the command is kept (under a hundred bytes): nothing of the
/// credentials, and nothing a server said that another Project's poll of
/// the same URL would not be told too.
#[derive(Debug, Default)]
pub struct V2Servers {
    commands: Mutex<HashMap<String, Bytes>>,
}

impl V2Servers {
    fn command(&self, url: &str) -> Option<Bytes> {
        self.commands.lock().ok()?.get(url).cloned()
    }

    fn remember(&self, url: &str, command: Bytes) {
        let Ok(mut commands) = self.commands.lock() else {
            return;
        };
        if commands.len() >= MAX_V2_SERVERS && !commands.contains_key(url) {
            commands.clear();
        }
        commands.insert(url.to_owned(), command);
    }

    fn forget(&self, url: &str) {
        if let Ok(mut commands) = self.commands.lock() {
            commands.remove(url);
        }
    }

    /// How many repositories have a command kept.
    pub fn len(&self) -> usize {
        self.commands.lock().map_or(0, |c| c.len())
    }

    /// Whether no repository has a command kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the ref advertisement says: the refs themselves (protocol v0/v1),
/// or the capabilities of a v2 server, which lists refs on request.
enum Advertised {
    Refs(Vec<Ref>),
    V2(Capabilities),
}

/// Parse a smart-HTTP ref advertisement (its `# service=` announcement
/// first, when there is one), as gix's HTTP transport does.
fn advertisement(body: &[u8]) -> Result<Advertised, gix::Error> {
    let mut lines = StreamingPeekableIter::new(body, &[PacketLineRef::Flush], false);
    let first = lines
        .peek_line()
        .ok_or_else(|| gix::error::message("the server sent an empty ref advertisement").raise())?
        .map_err(|e| e.raise())?
        .map_err(|e| gix::error::message!("{e}").raise())?;
    let announced = first
        .as_text()
        .and_then(|text| text.as_slice().strip_prefix(b"# service="))
        .map(<[u8]>::to_vec);
    if let Some(service) = announced {
        if service != b"git-upload-pack" {
            return Err(gix::error::message("the server announced another git service").raise());
        }
        // The announcement ends at a flush; dropping the reader resets the
        // lines to what follows.
        std::io::Read::read_to_end(&mut lines.as_read(), &mut Vec::new()).map_err(|e| e.raise())?;
    }
    let handshake =
        Handshake::from_lines_with_version_detection(&mut lines).map_err(|e| e.raise())?;
    match handshake.protocol {
        Protocol::V2 => Ok(Advertised::V2(handshake.capabilities)),
        Protocol::V0 | Protocol::V1 => {
            let Some(mut listed) = handshake.refs else {
                return Err(gix::error::message("the server advertised no refs").raise());
            };
            let (refs, _shallow) =
                refs::from_v1_refs_received_as_part_of_handshake_and_capabilities(
                    &mut listed,
                    handshake.capabilities.iter(),
                )?;
            Ok(Advertised::Refs(refs))
        }
    }
}

/// The `ls-refs` command for branches only, with the server's object format
/// and Kapsa's agent when the server names its own.
fn ls_refs_command(capabilities: &Capabilities) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    encode::text_to_write(b"command=ls-refs", &mut out)?;
    if capabilities.contains("agent") {
        let agent = format!("agent=kapsa/{}", env!("CARGO_PKG_VERSION"));
        encode::text_to_write(agent.as_bytes(), &mut out)?;
    }
    if let Some(format) = capabilities
        .capability("object-format")
        .and_then(|c| c.value())
    {
        let mut line = b"object-format=".to_vec();
        line.extend_from_slice(format);
        encode::text_to_write(&line, &mut out)?;
    }
    encode::delim_to_write(&mut out)?;
    encode::text_to_write(b"ref-prefix refs/heads/", &mut out)?;
    encode::flush_to_write(&mut out)?;
    Ok(out)
}

/// Parse a v2 `ls-refs` answer (an `ERR` line in it is the server's refusal).
fn ls_refs_answer(body: &[u8]) -> Result<Vec<Ref>, gix::Error> {
    let mut lines = StreamingPeekableIter::new(body, &[PacketLineRef::Flush], false);
    lines.fail_on_err_lines(true);
    refs::from_v2_refs(&mut lines.as_read())
}

/// The requests of one listing: the client, where they may go, and the
/// credentials once the server has asked for them.
struct Exchange<'a> {
    client: reqwest::Client,
    origin: Origin,
    remote: &'a RemoteUrl,
    basic: Option<(&'a str, &'a str)>,
    /// The server answered 401: every later request brings the credentials.
    asked_for_credentials: bool,
    budget: &'a Budget,
    timeout: std::time::Duration,
}

impl Exchange<'_> {
    /// `method` to `path` under the repository URL (with `body` for a POST),
    /// and the whole answer, read through the budget. A 401 is answered once
    /// with the credentials, if there are any.
    async fn request(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Vec<u8>, GitError> {
        let display = &self.remote.display;
        let mut url = reqwest::Url::parse(&self.remote.url.to_bstring().to_string())
            .map_err(|e| GitError::InvalidUrl(format!("{display}: {e}")))?;
        // Credentials come from the Secret, never from the URL.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let joined = format!("{}/{path}", url.path().trim_end_matches('/'));
        let (joined_path, query) = joined.split_once('?').unwrap_or((joined.as_str(), ""));
        url.set_path(joined_path);
        url.set_query((!query.is_empty()).then_some(query));
        if Origin::of_request(&url) != self.origin {
            return Err(GitError::Internal(format!(
                "{display}: a request left the URL's origin"
            )));
        }
        let expected = if body.is_some() {
            RESULT
        } else {
            ADVERTISEMENT
        };
        loop {
            let mut request = self
                .client
                .request(method.clone(), url.clone())
                .header(
                    reqwest::header::USER_AGENT,
                    concat!("kapsa/", env!("CARGO_PKG_VERSION")),
                )
                .header("Git-Protocol", "version=2");
            if let Some(body) = &body {
                request = request
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-git-upload-pack-request",
                    )
                    .header(reqwest::header::ACCEPT, RESULT)
                    .body(body.clone());
            }
            if self.asked_for_credentials
                && let Some((username, password)) = self.basic
            {
                request = request.basic_auth(username, Some(password));
            }
            let response = request.send().await.map_err(|e| self.transport_error(&e))?;
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED {
                if self.basic.is_some() && !self.asked_for_credentials {
                    self.asked_for_credentials = true;
                    continue;
                }
                return Err(GitError::AuthenticationFailed(match self.basic {
                    Some(_) => format!("{display}: the server refused the credentials (HTTP 401)"),
                    None => format!(
                        "{display}: the server requires authentication and no credentials Secret is referenced"
                    ),
                }));
            }
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned())
                    .unwrap_or_else(|| "another location".into());
                return Err(GitError::Redirected(format!(
                    "{display}: the server redirects to {}, and Kapsa follows no redirect (credentials and requests go to the URL's own host only); set the URL to the repository's final location",
                    bounded(&location, MAX_PART_CHARS)
                )));
            }
            if status == reqwest::StatusCode::NOT_FOUND {
                return Err(GitError::NotFound(format!(
                    "{display}: HTTP status 404 (no such repository)"
                )));
            }
            if status == reqwest::StatusCode::FORBIDDEN {
                return Err(GitError::AuthenticationFailed(format!(
                    "{display}: the server refuses access (HTTP 403)"
                )));
            }
            if !status.is_success() {
                return Err(GitError::Unreachable(format!(
                    "{display}: HTTP status {}",
                    status.as_str()
                )));
            }
            // The media type, without parameters such as a charset.
            let media_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .map(str::trim)
                .unwrap_or_default();
            if !media_type.eq_ignore_ascii_case(expected) {
                return Err(GitError::Unreachable(format!(
                    "{display}: the server's answer is not a smart-HTTP git {} (Kapsa does not read dumb HTTP or web pages)",
                    if body.is_some() {
                        "ls-refs answer"
                    } else {
                        "ref advertisement"
                    }
                )));
            }
            return self.read(response).await;
        }
    }

    /// The refs the server's answer to the `ls-refs` `command` lists.
    async fn ls_refs(&mut self, command: Bytes) -> Result<Vec<Ref>, GitError> {
        let answer = self
            .request(reqwest::Method::POST, "git-upload-pack", Some(command))
            .await?;
        ls_refs_answer(&answer).map_err(|e| self.failed(&e))
    }

    /// The whole body, chunk by chunk, each counted against the budget
    /// before it is kept.
    async fn read(&self, mut response: reqwest::Response) -> Result<Vec<u8>, GitError> {
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(&e))?
        {
            self.budget
                .spend(chunk.len())
                .map_err(|e| e.prefixed(&self.remote.display))?;
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A request that failed below HTTP: a timeout, or the host unreachable
    /// (with the causes, each bounded).
    fn transport_error(&self, error: &reqwest::Error) -> GitError {
        if error.is_timeout() {
            return GitError::Timeout(self.timeout);
        }
        let mut parts: Vec<String> = Vec::new();
        let mut cause: Option<&dyn std::error::Error> = Some(error);
        while let Some(e) = cause {
            let text = bounded(e.to_string().trim(), MAX_PART_CHARS);
            if !text.is_empty() && !parts.iter().any(|p| p.contains(text.as_str())) {
                parts.push(text);
            }
            cause = e.source();
        }
        GitError::Unreachable(format!("{}: {}", self.remote.display, parts.join(": ")))
    }

    /// What a server's answer that gix could not parse means for the user.
    fn failed(&self, error: &gix::Error) -> GitError {
        classify(error, self.remote, self.basic.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(lines: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in lines {
            match *line {
                "0000" => encode::flush_to_write(&mut out).unwrap(),
                "0001" => encode::delim_to_write(&mut out).unwrap(),
                text => encode::data_to_write(text.as_bytes(), &mut out).unwrap(),
            };
        }
        out
    }

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn names(refs: &[Ref]) -> Vec<String> {
        refs.iter()
            .map(|r| r.unpack().0.to_string())
            .collect::<Vec<_>>()
    }

    #[test]
    fn a_v1_advertisement_lists_its_refs() {
        let body = pkt(&[
            "# service=git-upload-pack\n",
            "0000",
            &format!("{A} HEAD\0symref=HEAD:refs/heads/main agent=git/2\n"),
            &format!("{A} refs/heads/main\n"),
            &format!("{B} refs/tags/v1\n"),
            &format!("{A} refs/tags/v1^{{}}\n"),
            "0000",
        ]);
        let Ok(Advertised::Refs(refs)) = advertisement(&body) else {
            panic!("refs expected");
        };
        assert_eq!(names(&refs), ["HEAD", "refs/heads/main", "refs/tags/v1"]);
    }

    #[test]
    fn a_v2_advertisement_gives_capabilities_and_the_command_asks_for_branches() {
        let body = pkt(&[
            "# service=git-upload-pack\n",
            "0000",
            "version 2\n",
            "agent=git/2.47\n",
            "ls-refs=unborn\n",
            "object-format=sha1\n",
            "0000",
        ]);
        let Ok(Advertised::V2(capabilities)) = advertisement(&body) else {
            panic!("v2 expected");
        };
        assert!(capabilities.contains("ls-refs"));
        let command = ls_refs_command(&capabilities).unwrap();
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            String::from_utf8(command).unwrap(),
            String::from_utf8(pkt(&[
                "command=ls-refs\n",
                &format!("agent=kapsa/{version}\n"),
                "object-format=sha1\n",
                "0001",
                "ref-prefix refs/heads/\n",
                "0000",
            ]))
            .unwrap()
        );
    }

    #[test]
    fn an_ls_refs_answer_is_parsed_and_an_err_line_is_the_servers_refusal() {
        let answer = pkt(&[
            &format!("{A} refs/heads/main\n"),
            &format!("{B} refs/heads/feature/x symref-target:refs/heads/main\n"),
            "0000",
        ]);
        let refs = ls_refs_answer(&answer).unwrap();
        assert_eq!(names(&refs), ["refs/heads/main", "refs/heads/feature/x"]);

        let refused = pkt(&["ERR access denied to REPO\n"]);
        let err = ls_refs_answer(&refused).unwrap_err();
        assert!(
            super::super::remote::server_error_line(&err)
                .is_some_and(|line| line.contains("access denied to REPO")),
            "{err:?}"
        );
    }

    #[test]
    fn what_is_not_an_advertisement_is_refused() {
        for body in [
            &b""[..],
            b"<html>not git</html>",
            &pkt(&["# service=git-receive-pack\n", "0000"]),
        ] {
            assert!(advertisement(body).is_err(), "{body:?}");
        }
    }
}
