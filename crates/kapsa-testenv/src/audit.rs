//! The kube-apiserver's audit log, as a test oracle.
//!
//! Tests judge the operator by what the API server saw: every request it
//! answered, by which user, with which verb on which object, and the response
//! code. A control plane started with the audit log on
//! ([`crate::ControlPlane::start_with_audit_log`], and the shared test control
//! plane) writes one JSON line per request stage to `<dir>/audit.log` under
//! [`POLICY`]; an [`AuditLog`] reads it back.
//!
//! ```ignore
//! let audit = env.audit_log();
//! let mark = audit.mark().await;
//! // ... run the operator as user `kapsa-operator` ...
//! let events = audit.events_since(mark).await;
//! let writes = audit::count(&events, |e| e.user == "kapsa-operator" && e.is_write());
//! assert!(writes <= 3, "{:#?}", audit::summary_by(&events, "kapsa-operator"));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The audit policy: every request at level `Metadata` (who, what, which
/// object, response code; no bodies), except the noise tests never count:
/// reads of Events and Leases, and health, version, OpenAPI and discovery
/// endpoints, which are not logged at all. The `RequestReceived` stage is
/// omitted, so a request has one line (`ResponseComplete`), two for a watch
/// (`ResponseStarted` when it opens).
pub const POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: None
  verbs: ["get", "list", "watch"]
  resources:
  - group: ""
    resources: ["events"]
  - group: "events.k8s.io"
    resources: ["events"]
  - group: "coordination.k8s.io"
    resources: ["leases"]
- level: None
  nonResourceURLs:
  - "/readyz"
  - "/readyz/*"
  - "/healthz"
  - "/healthz/*"
  - "/livez"
  - "/livez/*"
  - "/openapi/*"
  - "/version"
  - "/version/*"
  - "/api"
  - "/api/*"
  - "/apis"
  - "/apis/*"
- level: Metadata
"#;

/// How long the API server may take, after the client has its response, to
/// append the request's line: in `blocking` mode it writes the line in the
/// request's own goroutine, right after the response (measured: well under
/// 10 ms). [`AuditLog::mark`] and [`AuditLog::events_since`] wait this long
/// first, so that a request made just before them falls on the right side.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The stage of a finished request, the only one that counts.
pub const RESPONSE_COMPLETE: &str = "ResponseComplete";

/// The audit log file of a control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLog {
    path: PathBuf,
}

/// A position in the audit log: the end of its last complete line when the
/// mark was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct AuditMark {
    offset: u64,
}

impl AuditMark {
    /// The start of the log: events since it are all events.
    pub const START: Self = Self { offset: 0 };

    /// Byte offset in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl AuditLog {
    /// The audit log at `path` (which may not exist yet: the API server
    /// creates it with its first line).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current end of the log, after waiting [`SETTLE`] for the lines of
    /// requests already answered.
    pub async fn mark(&self) -> AuditMark {
        tokio::time::sleep(SETTLE).await;
        self.mark_now()
    }

    /// The current end of the log, without waiting.
    pub fn mark_now(&self) -> AuditMark {
        AuditMark {
            offset: self.end_of_last_line(),
        }
    }

    /// The finished requests (stage `ResponseComplete`) logged after `mark`,
    /// in log order, after waiting [`SETTLE`] for the lines of requests just
    /// answered. A watch is counted when it ends, so one opened before the
    /// mark and closed after it is among them.
    pub async fn events_since(&self, mark: AuditMark) -> Vec<AuditEvent> {
        tokio::time::sleep(SETTLE).await;
        self.events_since_now(mark)
    }

    /// [`Self::events_since`] without waiting.
    pub fn events_since_now(&self, mark: AuditMark) -> Vec<AuditEvent> {
        self.all_stages_since(mark)
            .into_iter()
            .filter(|e| e.stage == RESPONSE_COMPLETE)
            .collect()
    }

    /// Every line logged after `mark`, whatever its stage, without waiting.
    ///
    /// Panics if a complete line is not an audit event: an oracle that
    /// skipped lines would undercount.
    pub fn all_stages_since(&self, mark: AuditMark) -> Vec<AuditEvent> {
        let bytes = self.complete_lines_since(mark.offset);
        bytes
            .split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(|line| {
                AuditEvent::from_json_line(line).unwrap_or_else(|e| {
                    panic!(
                        "{}: not an audit event ({e}): {}",
                        self.path.display(),
                        String::from_utf8_lossy(line)
                    )
                })
            })
            .collect()
    }

    /// Polls the finished requests since `mark` until `done` holds for them,
    /// for at most `timeout`. `Err` holds the last events seen.
    pub async fn wait_for(
        &self,
        mark: AuditMark,
        timeout: Duration,
        mut done: impl FnMut(&[AuditEvent]) -> bool,
    ) -> Result<Vec<AuditEvent>, Vec<AuditEvent>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let events = self.events_since_now(mark);
            if done(&events) {
                return Ok(events);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(events);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The complete lines after `offset`; a partial last line, still being
    /// written, is left out.
    fn complete_lines_since(&self, offset: u64) -> Vec<u8> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        assert!(
            len >= offset,
            "{} shrank below a mark ({len} < {offset} bytes): was it rotated or replaced?",
            self.path.display()
        );
        let mut bytes = Vec::with_capacity((len - offset) as usize);
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.take(len - offset).read_to_end(&mut bytes))
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.path.display()));
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(complete);
        bytes
    }

    /// The end of the last complete line, reading only the file's tail.
    fn end_of_last_line(&self) -> u64 {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return 0;
        };
        let mut end = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut chunk = vec![0u8; 64 * 1024];
        while end > 0 {
            let start = end.saturating_sub(chunk.len() as u64);
            let n = (end - start) as usize;
            file.seek(SeekFrom::Start(start))
                .and_then(|_| file.read_exact(&mut chunk[..n]))
                .unwrap_or_else(|e| panic!("reading {}: {e}", self.path.display()));
            if let Some(i) = chunk[..n].iter().rposition(|b| *b == b'\n') {
                return start + i as u64 + 1;
            }
            end = start;
        }
        0
    }
}

/// One audit event (one stage of one request), with the fields tests use.
/// Absent fields are empty strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub audit_id: String,
    /// `ResponseComplete`, or `ResponseStarted` for a watch that opened.
    pub stage: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`,
    /// `deletecollection`; for a non-resource URL, the HTTP method in lower case.
    pub verb: String,
    /// `user.username`: the client certificate's common name, for instance.
    pub user: String,
    pub groups: Vec<String>,
    pub user_agent: String,
    pub request_uri: String,
    /// `""` for the core group.
    pub api_group: String,
    pub api_version: String,
    /// Plural resource name; `""` for a non-resource URL.
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// HTTP status of the response; 0 if none was recorded.
    pub response_code: u16,
    /// RFC 3339 with microseconds, as logged.
    pub request_received_timestamp: String,
    pub stage_timestamp: String,
}

const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

impl AuditEvent {
    /// Parses one line of the JSON audit log (an `audit.k8s.io/v1` Event).
    pub fn from_json_line(line: &[u8]) -> Result<Self, serde_json::Error> {
        let raw: RawEvent = serde_json::from_slice(line)?;
        let object = raw.object_ref.unwrap_or_default();
        Ok(Self {
            audit_id: raw.audit_id,
            stage: raw.stage,
            verb: raw.verb,
            user: raw.user.username,
            groups: raw.user.groups,
            user_agent: raw.user_agent,
            request_uri: raw.request_uri,
            api_group: object.api_group,
            api_version: object.api_version,
            resource: object.resource,
            subresource: object.subresource,
            namespace: object.namespace,
            name: object.name,
            response_code: raw.response_status.and_then(|s| s.code).unwrap_or(0),
            request_received_timestamp: raw.request_received_timestamp,
            stage_timestamp: raw.stage_timestamp,
        })
    }

    /// Whether the request asked to change something (create, update, patch,
    /// delete, deletecollection), whether or not it succeeded.
    pub fn is_write(&self) -> bool {
        WRITE_VERBS.contains(&self.verb.as_str())
    }

    /// `resource` or `resource/subresource`; for a non-resource URL, its path.
    pub fn target(&self) -> String {
        match (self.resource.as_str(), self.subresource.as_str()) {
            ("", _) => self
                .request_uri
                .split('?')
                .next()
                .unwrap_or_default()
                .to_string(),
            (resource, "") => resource.to_string(),
            (resource, subresource) => format!("{resource}/{subresource}"),
        }
    }
}

impl fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.user, self.verb, self.target())?;
        match (self.namespace.as_str(), self.name.as_str()) {
            ("", "") => {}
            ("", name) => write!(f, " {name}")?,
            (namespace, name) => write!(f, " {namespace}/{name}")?,
        }
        write!(f, " -> {}", self.response_code)
    }
}

/// A predicate: the request was a write (see [`AuditEvent::is_write`]).
pub fn writes(event: &AuditEvent) -> bool {
    event.is_write()
}

/// A predicate: the request was made by `user`.
pub fn by_user(user: &str) -> impl Fn(&AuditEvent) -> bool + '_ {
    move |event| event.user == user
}

/// How many of `events` satisfy `predicate`.
pub fn count(events: &[AuditEvent], predicate: impl Fn(&AuditEvent) -> bool) -> usize {
    events.iter().filter(|e| predicate(e)).count()
}

/// `user`'s requests among `events`, counted by `"verb resource[/subresource]"`
/// (`"verb /path"` for a non-resource URL): a readable summary for a failed
/// assertion.
pub fn summary_by(events: &[AuditEvent], user: &str) -> BTreeMap<String, usize> {
    let mut summary = BTreeMap::new();
    for event in events.iter().filter(|e| e.user == user) {
        *summary
            .entry(format!("{} {}", event.verb, event.target()))
            .or_insert(0) += 1;
    }
    summary
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEvent {
    #[serde(rename = "auditID", default)]
    audit_id: String,
    #[serde(default)]
    stage: String,
    #[serde(default)]
    verb: String,
    #[serde(default)]
    user: RawUser,
    #[serde(default)]
    user_agent: String,
    #[serde(rename = "requestURI", default)]
    request_uri: String,
    #[serde(default)]
    object_ref: Option<RawObjectRef>,
    #[serde(default)]
    response_status: Option<RawStatus>,
    #[serde(default)]
    request_received_timestamp: String,
    #[serde(default)]
    stage_timestamp: String,
}

#[derive(Deserialize, Default)]
struct RawUser {
    #[serde(default)]
    username: String,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawObjectRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    subresource: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    api_group: String,
    #[serde(default)]
    api_version: String,
}

#[derive(Deserialize)]
struct RawStatus {
    #[serde(default)]
    code: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const CREATE: &str = r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/ns/configmaps?fieldManager=x","verb":"create","user":{"username":"kapsa-operator","groups":["system:masters","system:authenticated"]},"sourceIPs":["127.0.0.1"],"userAgent":"kube-rs/5","objectRef":{"resource":"configmaps","namespace":"ns","name":"c","apiVersion":"v1"},"responseStatus":{"metadata":{},"code":201},"requestReceivedTimestamp":"2026-01-02T03:04:05.000001Z","stageTimestamp":"2026-01-02T03:04:05.000900Z","annotations":{"authorization.k8s.io/decision":"allow"}}"#;
    const STATUS_PATCH: &str = r#"{"auditID":"a2","stage":"ResponseComplete","requestURI":"/apis/apps/v1/namespaces/ns/deployments/web/status","verb":"patch","user":{"username":"kapsa-operator"},"objectRef":{"resource":"deployments","subresource":"status","namespace":"ns","name":"web","apiGroup":"apps","apiVersion":"v1"},"responseStatus":{"metadata":{},"code":200},"requestReceivedTimestamp":"t","stageTimestamp":"t"}"#;
    const WATCH_STARTED: &str = r#"{"auditID":"a3","stage":"ResponseStarted","requestURI":"/api/v1/configmaps?watch=true","verb":"watch","user":{"username":"kapsa-operator"},"objectRef":{"resource":"configmaps","apiVersion":"v1"},"responseStatus":{"metadata":{},"code":200},"requestReceivedTimestamp":"t","stageTimestamp":"t"}"#;
    const FORBIDDEN: &str = r#"{"auditID":"a4","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/ns/secrets/s","verb":"get","user":{"username":"nobody","groups":["system:authenticated"]},"objectRef":{"resource":"secrets","namespace":"ns","name":"s","apiVersion":"v1"},"responseStatus":{"metadata":{},"status":"Failure","reason":"Forbidden","code":403},"requestReceivedTimestamp":"t","stageTimestamp":"t"}"#;
    const NON_RESOURCE: &str = r#"{"auditID":"a5","stage":"ResponseComplete","requestURI":"/metrics","verb":"get","user":{"username":"kapsa-operator"},"responseStatus":{"metadata":{},"code":200},"requestReceivedTimestamp":"t","stageTimestamp":"t"}"#;

    fn log_with(lines: &[&str]) -> (tempfile::TempDir, AuditLog, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::at(dir.path().join("audit.log"));
        let mut file = std::fs::File::create(log.path()).unwrap();
        for line in lines {
            writeln!(file, "{line}").unwrap();
        }
        (dir, log, file)
    }

    #[test]
    fn parses_the_fields_tests_use() {
        let e = AuditEvent::from_json_line(CREATE.as_bytes()).unwrap();
        assert_eq!(e.audit_id, "a1");
        assert_eq!(e.stage, "ResponseComplete");
        assert_eq!(e.verb, "create");
        assert_eq!(e.user, "kapsa-operator");
        assert_eq!(e.groups, ["system:masters", "system:authenticated"]);
        assert_eq!(e.user_agent, "kube-rs/5");
        assert_eq!((e.api_group.as_str(), e.api_version.as_str()), ("", "v1"));
        assert_eq!(
            (e.resource.as_str(), e.subresource.as_str()),
            ("configmaps", "")
        );
        assert_eq!((e.namespace.as_str(), e.name.as_str()), ("ns", "c"));
        assert_eq!(e.response_code, 201);
        assert_eq!(e.request_received_timestamp, "2026-01-02T03:04:05.000001Z");
        assert!(e.is_write());
        assert_eq!(
            e.to_string(),
            "kapsa-operator create configmaps ns/c -> 201"
        );

        let patch = AuditEvent::from_json_line(STATUS_PATCH.as_bytes()).unwrap();
        assert_eq!(patch.api_group, "apps");
        assert_eq!(patch.target(), "deployments/status");
        let other = AuditEvent::from_json_line(NON_RESOURCE.as_bytes()).unwrap();
        assert_eq!(other.target(), "/metrics");
        assert!(!other.is_write());
        assert!(AuditEvent::from_json_line(b"{not json").is_err());
    }

    #[test]
    fn events_since_a_mark_skip_other_stages_and_a_partial_line() {
        let (_dir, log, mut file) = log_with(&[CREATE, WATCH_STARTED]);
        assert_eq!(log.all_stages_since(AuditMark::START).len(), 2);
        assert_eq!(log.events_since_now(AuditMark::START).len(), 1);

        let mark = log.mark_now();
        assert_eq!(mark.offset(), std::fs::metadata(log.path()).unwrap().len());
        assert!(log.events_since_now(mark).is_empty());

        // A line being written: not yet an event, and a mark stops before it.
        let (head, tail) = STATUS_PATCH.split_at(40);
        write!(file, "{head}").unwrap();
        assert!(log.events_since_now(mark).is_empty());
        assert_eq!(log.mark_now(), mark);
        writeln!(file, "{tail}").unwrap();
        writeln!(file, "{FORBIDDEN}").unwrap();
        let events = log.events_since_now(mark);
        let ids: Vec<_> = events.iter().map(|e| e.audit_id.as_str()).collect();
        assert_eq!(ids, ["a2", "a4"]);
        assert!(log.mark_now() > mark);
    }

    #[test]
    fn a_missing_log_has_no_events() {
        let log = AuditLog::at("/nonexistent/kapsa/audit.log");
        assert_eq!(log.mark_now(), AuditMark::START);
        assert!(log.events_since_now(AuditMark::START).is_empty());
    }

    #[test]
    #[should_panic(expected = "not an audit event")]
    fn a_garbled_line_fails_loudly() {
        let (_dir, log, _file) = log_with(&[CREATE, "garbage"]);
        log.events_since_now(AuditMark::START);
    }

    #[test]
    fn counts_and_summaries() {
        let lines = [
            CREATE,
            STATUS_PATCH,
            WATCH_STARTED,
            FORBIDDEN,
            NON_RESOURCE,
            STATUS_PATCH,
        ];
        let events: Vec<_> = lines
            .iter()
            .map(|l| AuditEvent::from_json_line(l.as_bytes()).unwrap())
            .filter(|e| e.stage == RESPONSE_COMPLETE)
            .collect();
        assert_eq!(count(&events, writes), 3);
        assert_eq!(count(&events, by_user("nobody")), 1);
        assert_eq!(
            count(&events, |e| by_user("kapsa-operator")(e) && e.is_write()),
            3
        );
        let summary = summary_by(&events, "kapsa-operator");
        let expected: BTreeMap<String, usize> = [
            ("create configmaps".to_string(), 1),
            ("get /metrics".to_string(), 1),
            ("patch deployments/status".to_string(), 2),
        ]
        .into_iter()
        .collect();
        assert_eq!(summary, expected);
        assert!(summary_by(&events, "somebody-else").is_empty());
    }
}
