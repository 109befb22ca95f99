//! The `ssh` command for one connection: a private key and known_hosts in a
//! private temporary folder, options that keep the host's ssh
//! configuration, keys and agent out, and the one address that was checked
//! against the operator's host policy (ssh does not look the name up again).
//!
//! The operator starts `ssh` itself (not through a shell), so that it holds
//! the process and can kill it when a listing gives up.

use std::{
    fs,
    io::{self, Read, Write},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use super::GitError;

/// Files for one ssh connection, in a folder only the operator can read
/// (0700, the key 0600). Dropping it deletes them.
pub(crate) struct SshSession {
    dir: tempfile::TempDir,
    strict: bool,
    timeout: Duration,
}

impl SshSession {
    /// Write the key (and known_hosts, if given).
    ///
    /// Host keys: with `known_hosts`, `StrictHostKeyChecking=yes` against
    /// exactly those keys. Without, `StrictHostKeyChecking=accept-new` into an
    /// empty temporary known_hosts: the connection works, but with no defence
    /// against a man-in-the-middle, since nothing is remembered between polls.
    /// That was chosen over refusing so that a Secret made with only
    /// `ssh-privatekey` (as `kubectl create secret generic --type
    /// kubernetes.io/ssh-auth` gives) works; `known_hosts` is recommended.
    pub(crate) fn new(
        private_key: &str,
        known_hosts: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, GitError> {
        let internal = |what: &str, e: io::Error| GitError::Internal(format!("{what}: {e}"));
        let dir = tempfile::Builder::new()
            .prefix("kapsa-git-ssh-")
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(|e| internal("cannot create a temporary folder for the ssh key", e))?;
        let mut key = private_key.replace("\r\n", "\n");
        if !key.ends_with('\n') {
            // OpenSSH refuses a key without its final newline.
            key.push('\n');
        }
        write_private(&dir.path().join("identity"), key.as_bytes())
            .map_err(|e| internal("cannot write the ssh key", e))?;
        write_private(
            &dir.path().join("known_hosts"),
            known_hosts.unwrap_or_default().as_bytes(),
        )
        .map_err(|e| internal("cannot write known_hosts", e))?;
        Ok(SshSession {
            dir,
            strict: known_hosts.is_some(),
            timeout,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `program` (ssh) running `git-upload-pack` for `url`'s repository on
    /// `connect_to` (an address of the URL's host that the host policy
    /// allowed). Host keys are still looked up under the URL's host name
    /// (`HostKeyAlias`). The environment is empty but for `PATH`, a `HOME`
    /// in the session folder, `LANG=C` and `GIT_PROTOCOL=version=2`; stdin
    /// and stdout are pipes, stderr goes to a file ([`stderr`](Self::stderr)).
    pub(crate) fn command(
        &self,
        program: &Path,
        url: &gix::url::Url,
        connect_to: IpAddr,
    ) -> Result<Command, GitError> {
        let host = url
            .host()
            .filter(|h| !h.is_empty() && !h.starts_with('-'))
            .ok_or_else(|| GitError::InvalidUrl("the URL has no usable host".into()))?;
        if url.user().is_some_and(|u| u.starts_with('-')) {
            return Err(GitError::InvalidUrl(
                "a user name may not start with '-'".into(),
            ));
        }
        let path = gix::url::expand_path::for_shell(url.path.clone());
        if path.first() == Some(&b'-') {
            return Err(GitError::InvalidUrl(
                "a repository path may not start with '-'".into(),
            ));
        }
        let quoted = gix::quote::single(gix::bstr::ByteSlice::as_bstr(path.as_slice()));
        let remote_command = format!("git-upload-pack {}", String::from_utf8_lossy(&quoted));
        // known_hosts names a host on another port `[host]:port`.
        let alias = match url.port {
            Some(port) if port != 22 => format!("[{host}]:{port}"),
            _ => host.to_owned(),
        };
        let destination = match url.user() {
            Some(user) => format!("{user}@{host}"),
            None => host.to_owned(),
        };
        let stderr = fs::File::create(self.path("stderr")).map_err(|e| {
            GitError::Internal(format!("cannot create a file for ssh's errors: {e}"))
        })?;
        let mut command = Command::new(program);
        for option in options(
            &self.path("identity"),
            &self.path("known_hosts"),
            self.strict,
            self.timeout,
        ) {
            command.arg(option);
        }
        command.args([
            "-o".to_owned(),
            format!("HostName={connect_to}"),
            "-o".to_owned(),
            format!("HostKeyAlias={alias}"),
        ]);
        if let Some(port) = url.port {
            command.arg(format!("-p{port}"));
        }
        command
            .arg("--")
            .arg(destination)
            .arg(remote_command)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("HOME", self.dir.path())
            .env("LANG", "C")
            .env("LC_ALL", "C")
            .env("GIT_PROTOCOL", "version=2")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        Ok(command)
    }

    /// What ssh printed on stderr (its last 4 KiB), for error messages.
    pub(crate) fn stderr(&self) -> String {
        let mut buf = Vec::new();
        if let Ok(file) = fs::File::open(self.path("stderr")) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let mut file = file;
            if len > 4096 {
                use std::io::Seek;
                let _ = file.seek(io::SeekFrom::Start(len - 4096));
            }
            let _ = file.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).trim().to_owned()
    }
}

fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// The options of every connection, one argument each.
fn options(key: &Path, known_hosts: &Path, strict: bool, timeout: Duration) -> Vec<String> {
    let connect_timeout = timeout.as_secs().clamp(1, 120);
    let alive_interval = (timeout.as_secs() / 3).clamp(1, 15);
    let mut args = vec![
        // No ~/.ssh/config, no /etc/ssh/ssh_config.
        "-F".to_owned(),
        "/dev/null".to_owned(),
        "-i".to_owned(),
        key.display().to_string(),
    ];
    for option in [
        "IdentitiesOnly=yes".to_owned(),
        "IdentityAgent=none".to_owned(),
        "BatchMode=yes".to_owned(),
        "PasswordAuthentication=no".to_owned(),
        "KbdInteractiveAuthentication=no".to_owned(),
        format!(
            "StrictHostKeyChecking={}",
            if strict { "yes" } else { "accept-new" }
        ),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "GlobalKnownHostsFile=/dev/null".to_owned(),
        "UpdateHostKeys=no".to_owned(),
        "CheckHostIP=no".to_owned(),
        "ForwardAgent=no".to_owned(),
        "ClearAllForwardings=yes".to_owned(),
        "ControlMaster=no".to_owned(),
        "ControlPath=none".to_owned(),
        "ProxyCommand=none".to_owned(),
        "SendEnv=GIT_PROTOCOL".to_owned(),
        format!("ConnectTimeout={connect_timeout}"),
        format!("ServerAliveInterval={alive_interval}"),
        "ServerAliveCountMax=2".to_owned(),
        "LogLevel=ERROR".to_owned(),
    ] {
        args.push("-o".to_owned());
        args.push(option);
    }
    args
}

/// Classify a failed ssh connection from what ssh printed.
pub(crate) fn classify_failure(stderr: &str) -> Option<GitError> {
    let tail = || {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join("; ")
    };
    let has = |needle: &str| stderr.contains(needle);
    if stderr.trim().is_empty() {
        None
    } else if has("ssh: not found") || has("ssh: command not found") {
        Some(GitError::Internal(
            "the ssh program is not installed".into(),
        ))
    } else if has("Host key verification failed")
        || has("IDENTIFICATION HAS CHANGED")
        || has("host key is known for")
    {
        Some(GitError::HostKeyVerificationFailed(tail()))
    } else if has("Load key") || has("invalid format") {
        Some(GitError::InvalidSecret(format!(
            "ssh could not load the private key: {}",
            tail()
        )))
    } else if has("Permission denied") || has("Too many authentication failures") {
        Some(GitError::AuthenticationFailed(tail()))
    } else if has("epository not found")
        || has("does not appear to be a git repository")
        || has("does not exist")
    {
        Some(GitError::NotFound(tail()))
    } else {
        Some(GitError::Unreachable(tail()))
    }
}

/// Where a session keeps its files (for tests).
#[cfg(test)]
impl SshSession {
    fn dir(&self) -> std::path::PathBuf {
        self.dir.path().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----";

    #[test]
    fn key_is_private_and_deleted_on_drop() {
        let session = SshSession::new(KEY, None, Duration::from_secs(10)).unwrap();
        let dir = session.dir();
        let key = dir.join("identity");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(fs::read_to_string(&key).unwrap(), format!("{KEY}\n"));
        drop(session);
        assert!(!dir.exists());
        assert!(!key.exists());
    }

    fn args_of(command: &Command) -> Vec<String> {
        command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn command_isolates_ssh_and_connects_to_the_checked_address() {
        let session =
            SshSession::new(KEY, Some("h ssh-ed25519 AAAA"), Duration::from_secs(30)).unwrap();
        let url =
            gix::url::parse(b"ssh://git@git.example.com:2222/srv/shop.git".as_slice()).unwrap();
        let command = session
            .command(Path::new("ssh"), &url, "203.0.113.7".parse().unwrap())
            .unwrap();
        let dir = session.dir();
        assert_eq!(command.get_program(), "ssh");
        let args = args_of(&command);
        let joined = args.join(" ");
        for expected in [
            "-F /dev/null",
            "-o IdentitiesOnly=yes",
            "-o BatchMode=yes",
            "-o StrictHostKeyChecking=yes",
            "-o IdentityAgent=none",
            "-o GlobalKnownHostsFile=/dev/null",
            "-o ProxyCommand=none",
            "-o ConnectTimeout=30",
            "-o HostName=203.0.113.7",
            "-o HostKeyAlias=[git.example.com]:2222",
            "-p2222 -- git@git.example.com git-upload-pack '/srv/shop.git'",
        ] {
            assert!(
                joined.contains(expected),
                "{expected} missing from {joined}"
            );
        }
        assert!(
            joined.contains(&format!("-i {}/identity", dir.display())),
            "{joined}"
        );
        assert!(
            joined.contains(&format!("UserKnownHostsFile={}/known_hosts", dir.display())),
            "{joined}"
        );
        assert!(
            !joined.contains("AAAA"),
            "the key itself is never on the command line"
        );
        // Only what ssh needs from the environment.
        let envs: Vec<String> = command
            .get_envs()
            .filter_map(|(k, v)| v.map(|_| k.to_string_lossy().into_owned()))
            .collect();
        assert!(envs.contains(&"GIT_PROTOCOL".to_owned()), "{envs:?}");
        assert!(!envs.iter().any(|e| e == "SSH_AUTH_SOCK"), "{envs:?}");
        assert_eq!(
            fs::read_to_string(dir.join("known_hosts")).unwrap(),
            "h ssh-ed25519 AAAA"
        );

        let session = SshSession::new(KEY, None, Duration::from_secs(30)).unwrap();
        let url = gix::url::parse(b"git@github.com:acme/it's.git".as_slice()).unwrap();
        let args = args_of(
            &session
                .command(Path::new("ssh"), &url, "140.82.112.3".parse().unwrap())
                .unwrap(),
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("-o StrictHostKeyChecking=accept-new"),
            "{joined}"
        );
        assert!(joined.contains("-o HostKeyAlias=github.com "), "{joined}");
        assert!(!args.iter().any(|a| a.starts_with("-p")), "{joined}");
        // The path is one shell word on the server, whatever it holds.
        assert_eq!(args.last().unwrap(), "git-upload-pack 'acme/it'\\''s.git'");
    }

    #[test]
    fn classification() {
        assert!(matches!(
            classify_failure("git@127.0.0.1: Permission denied (publickey)."),
            Some(GitError::AuthenticationFailed(_))
        ));
        assert!(matches!(
            classify_failure(
                "No ED25519 host key is known for example.com and you have requested strict checking.\nHost key verification failed."
            ),
            Some(GitError::HostKeyVerificationFailed(_))
        ));
        assert!(matches!(
            classify_failure("ssh: connect to host 127.0.0.1 port 1: Connection refused"),
            Some(GitError::Unreachable(_))
        ));
        assert!(matches!(
            classify_failure("ERROR: Repository not found."),
            Some(GitError::NotFound(_))
        ));
        assert!(classify_failure("").is_none());
    }
}
