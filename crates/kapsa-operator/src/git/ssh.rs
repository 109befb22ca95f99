//! The `ssh` command line for one connection: a private key and known_hosts
//! in a private temporary folder, and options that keep the host's ssh
//! configuration, keys and agent out.

use std::{
    fs,
    io::{self, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    time::Duration,
};

use super::GitError;

/// Files for one ssh connection, in a folder only the operator can read
/// (0700, the key 0600). Dropping it deletes them.
pub(crate) struct SshSession {
    dir: tempfile::TempDir,
    command: String,
}

impl SshSession {
    /// Write the key (and known_hosts, if given) and build the command.
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
        let key_path = dir.path().join("identity");
        let mut key = private_key.replace("\r\n", "\n");
        if !key.ends_with('\n') {
            // OpenSSH refuses a key without its final newline.
            key.push('\n');
        }
        write_private(&key_path, key.as_bytes())
            .map_err(|e| internal("cannot write the ssh key", e))?;
        let known_hosts_path = dir.path().join("known_hosts");
        write_private(
            &known_hosts_path,
            known_hosts.unwrap_or_default().as_bytes(),
        )
        .map_err(|e| internal("cannot write known_hosts", e))?;
        let stderr_path = dir.path().join("stderr");
        let command = command_line(
            &key_path,
            &known_hosts_path,
            &stderr_path,
            known_hosts.is_some(),
            timeout,
        )?;
        Ok(SshSession { dir, command })
    }

    /// The command for gix's ssh transport. It runs through `sh -c`, which
    /// appends the host and remote command as `"$@"`.
    pub(crate) fn command(&self) -> &str {
        &self.command
    }

    /// What ssh printed on stderr (its last 4 KiB), for error messages.
    pub(crate) fn stderr(&self) -> String {
        let mut buf = Vec::new();
        if let Ok(file) = fs::File::open(self.dir.path().join("stderr")) {
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

/// `'…'` quoting for sh; the temporary paths never hold a quote, but refuse
/// one rather than trust that.
fn quote(path: &Path) -> Result<String, GitError> {
    let s = path
        .to_str()
        .filter(|s| !s.contains('\''))
        .ok_or_else(|| GitError::Internal(format!("unusable temporary path {path:?}")))?;
    Ok(format!("'{s}'"))
}

fn command_line(
    key: &Path,
    known_hosts: &Path,
    stderr: &Path,
    strict: bool,
    timeout: Duration,
) -> Result<String, GitError> {
    let connect_timeout = timeout.as_secs().clamp(1, 120);
    let alive_interval = (timeout.as_secs() / 3).clamp(1, 15);
    let opts: Vec<String> = vec![
        // No ~/.ssh/config, no /etc/ssh/ssh_config.
        "-F /dev/null".into(),
        format!("-i {}", quote(key)?),
        "-o IdentitiesOnly=yes".into(),
        "-o IdentityAgent=none".into(),
        "-o BatchMode=yes".into(),
        "-o PasswordAuthentication=no".into(),
        "-o KbdInteractiveAuthentication=no".into(),
        format!(
            "-o StrictHostKeyChecking={}",
            if strict { "yes" } else { "accept-new" }
        ),
        format!("-o UserKnownHostsFile={}", quote(known_hosts)?),
        "-o GlobalKnownHostsFile=/dev/null".into(),
        "-o UpdateHostKeys=no".into(),
        "-o ForwardAgent=no".into(),
        "-o ClearAllForwardings=yes".into(),
        "-o ControlMaster=no".into(),
        "-o ControlPath=none".into(),
        format!("-o ConnectTimeout={connect_timeout}"),
        format!("-o ServerAliveInterval={alive_interval}"),
        "-o ServerAliveCountMax=2".into(),
        "-o LogLevel=ERROR".into(),
    ];
    Ok(format!(
        "ssh {} \"$@\" 2>{}",
        opts.join(" "),
        quote(stderr)?
    ))
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

    #[test]
    fn command_isolates_ssh() {
        let session =
            SshSession::new(KEY, Some("h ssh-ed25519 AAAA"), Duration::from_secs(30)).unwrap();
        let cmd = session.command();
        let dir = session.dir();
        for expected in [
            "-F /dev/null",
            "-o IdentitiesOnly=yes",
            "-o BatchMode=yes",
            "-o StrictHostKeyChecking=yes",
            "-o IdentityAgent=none",
            "-o GlobalKnownHostsFile=/dev/null",
            "-o ConnectTimeout=30",
            "\"$@\"",
        ] {
            assert!(cmd.contains(expected), "{expected} missing from {cmd}");
        }
        assert!(cmd.starts_with("ssh "));
        assert!(
            cmd.contains(&format!("-i '{}/identity'", dir.display())),
            "{cmd}"
        );
        assert!(
            cmd.contains(&format!(
                "UserKnownHostsFile='{}/known_hosts'",
                dir.display()
            )),
            "{cmd}"
        );
        assert!(
            !cmd.contains("AAAA"),
            "the key itself is never on the command line"
        );
        assert_eq!(
            fs::read_to_string(dir.join("known_hosts")).unwrap(),
            "h ssh-ed25519 AAAA"
        );

        let session = SshSession::new(KEY, None, Duration::from_secs(30)).unwrap();
        assert!(
            session
                .command()
                .contains("-o StrictHostKeyChecking=accept-new")
        );
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
