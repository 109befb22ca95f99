use std::fmt;

use k8s_openapi::api::core::v1::Secret;

use super::GitError;

/// The `type` of a Secret holding a username and a password or token.
pub(crate) const BASIC_AUTH_SECRET_TYPE: &str = "kubernetes.io/basic-auth";
/// The `type` of a Secret holding an ssh private key.
pub(crate) const SSH_AUTH_SECRET_TYPE: &str = "kubernetes.io/ssh-auth";

/// The username used when a basic-auth Secret holds only a password (a
/// token): GitHub, Gitea and Bitbucket accept any username with a token.
pub(crate) const DEFAULT_TOKEN_USERNAME: &str = "git";

/// Credentials for a git remote, read from a Kubernetes Secret.
///
/// `Debug` and `Display` never show the password, token or key.
#[derive(Clone, PartialEq, Eq)]
pub enum GitCredentials {
    /// HTTP basic authentication; `password` may be a personal access token.
    Basic { username: String, password: String },
    /// An ssh private key (OpenSSH or PEM format), with the server's host keys
    /// in `known_hosts` format. Without `known_hosts`, the host key is
    /// accepted on first use for each poll (no protection against a
    /// man-in-the-middle): give `known_hosts` in production.
    SshKey {
        private_key: String,
        known_hosts: Option<String>,
    },
}

impl GitCredentials {
    /// Read credentials from a `kubernetes.io/basic-auth` Secret (keys
    /// `username`, `password`; the password may be a token and the username
    /// defaults to `git`) or a `kubernetes.io/ssh-auth`
    /// Secret (key `ssh-privatekey`, optional `known_hosts`). Both `data` and
    /// `stringData` are read (`data` wins). Any other type is refused with
    /// [`GitError::UnsupportedSecret`] naming the type.
    pub fn from_secret(secret: &Secret) -> Result<Self, GitError> {
        let name = secret.metadata.name.as_deref().unwrap_or("<unnamed>");
        let secret_type = secret.type_.as_deref().unwrap_or("Opaque");
        match secret_type {
            BASIC_AUTH_SECRET_TYPE => {
                let password = secret_value(secret, "password")?.unwrap_or_default();
                if password.is_empty() {
                    return Err(GitError::InvalidSecret(format!(
                        "Secret {name} of type {BASIC_AUTH_SECRET_TYPE} has no `password` (a password or a token)"
                    )));
                }
                let username = secret_value(secret, "username")?
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| DEFAULT_TOKEN_USERNAME.to_owned());
                Ok(GitCredentials::Basic { username, password })
            }
            SSH_AUTH_SECRET_TYPE => {
                let private_key = secret_value(secret, "ssh-privatekey")?
                    .filter(|k| !k.trim().is_empty())
                    .ok_or_else(|| {
                        GitError::InvalidSecret(format!(
                            "Secret {name} of type {SSH_AUTH_SECRET_TYPE} has no `ssh-privatekey`"
                        ))
                    })?;
                let known_hosts =
                    secret_value(secret, "known_hosts")?.filter(|k| !k.trim().is_empty());
                Ok(GitCredentials::SshKey {
                    private_key,
                    known_hosts,
                })
            }
            other => Err(GitError::UnsupportedSecret(format!(
                "Secret {name} has type {other}; git credentials need type {BASIC_AUTH_SECRET_TYPE} or {SSH_AUTH_SECRET_TYPE}"
            ))),
        }
    }

    /// The secret values, for scrubbing messages: the password, or the key
    /// and each of its long lines.
    pub(crate) fn secret_values(&self) -> Vec<&str> {
        match self {
            GitCredentials::Basic { password, .. } => vec![password.as_str()],
            GitCredentials::SshKey { private_key, .. } => std::iter::once(private_key.trim())
                .chain(
                    private_key
                        .lines()
                        .map(str::trim)
                        .filter(|l| l.len() >= 16 && !l.starts_with("-----")),
                )
                .collect(),
        }
    }
}

/// One value of the Secret, from `data` (base64-decoded by k8s-openapi) or
/// `stringData`. Non-UTF-8 data is an error that does not echo the data.
fn secret_value(secret: &Secret, key: &str) -> Result<Option<String>, GitError> {
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(bytes.0.clone()).map(Some).map_err(|_| {
            GitError::InvalidSecret(format!(
                "key `{key}` of Secret {} is not valid UTF-8",
                secret.metadata.name.as_deref().unwrap_or("<unnamed>")
            ))
        });
    }
    Ok(secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned())
}

impl fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitCredentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"[REDACTED]")
                .finish(),
            GitCredentials::SshKey { known_hosts, .. } => f
                .debug_struct("SshKey")
                .field("private_key", &"[REDACTED]")
                .field("known_hosts", &known_hosts.as_ref().map(|_| "[given]"))
                .finish(),
        }
    }
}

impl fmt::Display for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GitCredentials::Basic { username, .. } => {
                write!(f, "basic-auth credentials for user {username}")
            }
            GitCredentials::SshKey { known_hosts, .. } => write!(
                f,
                "ssh key credentials ({})",
                if known_hosts.is_some() {
                    "with known_hosts"
                } else {
                    "without known_hosts"
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    use super::*;

    fn secret(type_: Option<&str>, data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("shop-git".into()),
                ..Default::default()
            },
            type_: type_.map(Into::into),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    const TOKEN: &str = "ghp_s3cretTok3nValue";
    const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n-----END OPENSSH PRIVATE KEY-----\n";

    #[test]
    fn basic_auth_secret() {
        let s = secret(
            Some(BASIC_AUTH_SECRET_TYPE),
            &[("username", "alice"), ("password", TOKEN)],
        );
        assert_eq!(
            GitCredentials::from_secret(&s).unwrap(),
            GitCredentials::Basic {
                username: "alice".into(),
                password: TOKEN.into()
            }
        );
    }

    #[test]
    fn basic_auth_token_only_gets_default_username() {
        let s = secret(Some(BASIC_AUTH_SECRET_TYPE), &[("password", TOKEN)]);
        assert_eq!(
            GitCredentials::from_secret(&s).unwrap(),
            GitCredentials::Basic {
                username: DEFAULT_TOKEN_USERNAME.into(),
                password: TOKEN.into()
            }
        );
    }

    #[test]
    fn basic_auth_from_string_data() {
        let mut s = secret(Some(BASIC_AUTH_SECRET_TYPE), &[]);
        s.string_data = Some(BTreeMap::from([
            ("username".to_string(), "bob".to_string()),
            ("password".to_string(), TOKEN.to_string()),
        ]));
        assert!(matches!(
            GitCredentials::from_secret(&s).unwrap(),
            GitCredentials::Basic { username, .. } if username == "bob"
        ));
    }

    #[test]
    fn basic_auth_without_password_is_invalid() {
        let s = secret(Some(BASIC_AUTH_SECRET_TYPE), &[("username", "alice")]);
        let err = GitCredentials::from_secret(&s).unwrap_err();
        assert!(matches!(err, GitError::InvalidSecret(_)), "{err}");
    }

    #[test]
    fn ssh_auth_secret() {
        let s = secret(
            Some(SSH_AUTH_SECRET_TYPE),
            &[
                ("ssh-privatekey", KEY),
                ("known_hosts", "github.com ssh-ed25519 AAAA"),
            ],
        );
        assert_eq!(
            GitCredentials::from_secret(&s).unwrap(),
            GitCredentials::SshKey {
                private_key: KEY.into(),
                known_hosts: Some("github.com ssh-ed25519 AAAA".into())
            }
        );
        let s = secret(Some(SSH_AUTH_SECRET_TYPE), &[("ssh-privatekey", KEY)]);
        assert!(matches!(
            GitCredentials::from_secret(&s).unwrap(),
            GitCredentials::SshKey {
                known_hosts: None,
                ..
            }
        ));
    }

    #[test]
    fn ssh_auth_without_key_is_invalid() {
        let s = secret(Some(SSH_AUTH_SECRET_TYPE), &[("known_hosts", "x")]);
        assert!(matches!(
            GitCredentials::from_secret(&s),
            Err(GitError::InvalidSecret(_))
        ));
    }

    #[test]
    fn other_secret_types_are_refused_by_name() {
        for (type_, shown) in [
            (
                Some("kubernetes.io/dockerconfigjson"),
                "kubernetes.io/dockerconfigjson",
            ),
            (Some("Opaque"), "Opaque"),
            (None, "Opaque"),
        ] {
            let s = secret(type_, &[("password", TOKEN)]);
            match GitCredentials::from_secret(&s) {
                Err(GitError::UnsupportedSecret(msg)) => {
                    assert!(msg.contains(shown), "{msg}");
                    assert!(!msg.contains(TOKEN));
                }
                other => panic!("expected UnsupportedSecret, got {other:?}"),
            }
        }
    }

    #[test]
    fn non_utf8_value_is_invalid_and_not_echoed() {
        let mut s = secret(Some(BASIC_AUTH_SECRET_TYPE), &[]);
        s.data = Some(BTreeMap::from([(
            "password".to_string(),
            ByteString(vec![0xff, 0xfe, 0x41]),
        )]));
        assert!(matches!(
            GitCredentials::from_secret(&s),
            Err(GitError::InvalidSecret(_))
        ));
    }

    #[test]
    fn debug_and_display_never_show_secrets() {
        let basic = GitCredentials::Basic {
            username: "alice".into(),
            password: TOKEN.into(),
        };
        let ssh = GitCredentials::SshKey {
            private_key: KEY.into(),
            known_hosts: Some("github.com ssh-ed25519 AAAA".into()),
        };
        for text in [
            format!("{basic:?}"),
            format!("{basic:#?}"),
            format!("{basic}"),
            format!("{:?}", Some(&basic)),
        ] {
            assert!(!text.contains(TOKEN), "{text}");
            assert!(text.contains("alice"), "{text}");
        }
        for text in [format!("{ssh:?}"), format!("{ssh:#?}"), format!("{ssh}")] {
            assert!(
                !text.contains("b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"),
                "{text}"
            );
            assert!(!text.contains("PRIVATE KEY"), "{text}");
        }
    }

    #[test]
    fn scrub_removes_secret_values_from_errors() {
        let basic = GitCredentials::Basic {
            username: "alice".into(),
            password: TOKEN.into(),
        };
        let err = GitError::AuthenticationFailed(format!("server said {TOKEN} is wrong"))
            .scrub(&basic.secret_values());
        assert!(!err.to_string().contains(TOKEN));
        assert!(!format!("{err:?}").contains(TOKEN));
        let ssh = GitCredentials::SshKey {
            private_key: KEY.into(),
            known_hosts: None,
        };
        let err =
            GitError::Unreachable("bad key line b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ".into())
                .scrub(&ssh.secret_values());
        assert!(
            !err.to_string()
                .contains("b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ")
        );
    }
}
