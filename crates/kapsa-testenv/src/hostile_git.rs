//! Hostile "git servers" on loopback, for tests of what the operator
//! accepts from a git server: ones that advertise refs forever, trickle
//! bytes, redirect elsewhere, ask for credentials, answer with a huge error
//! line or a page that must never be quoted, or accept a connection and say
//! nothing (optionally after an ssh banner).
//!
//! [`HostileServer`] speaks just enough HTTP/1.1 for a git client over raw
//! TCP (one request per connection, `Connection: close`), so that it can
//! misbehave byte by byte. It records every request (method, target and
//! `Authorization` header), every accepted connection and when each ended.
//! It runs on a thread of its own with its own runtime (like
//! [`GitServer`](crate::git_server::GitServer)); dropping it stops it.
//!
//! Every answer goes only to the client that connected to it on
//! `127.0.0.1`; every loop ends when the client goes away or the server is
//! dropped.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The object id every fake ref points to.
pub const FAKE_COMMIT: &str = "1111111111111111111111111111111111111111";

/// How a [`HostileServer`] answers.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// `401` with a `WWW-Authenticate: Basic` challenge, to every request
    /// (a client with credentials sends them next).
    Challenge,
    /// `302` to `base` followed by the request's own target (same path and
    /// query, on another origin such as `http://127.0.0.1:<other port>`).
    Redirect { base: String },
    /// [`Challenge`](Self::Challenge) until a request brings an
    /// `Authorization` header, then [`Redirect`](Self::Redirect) to `base`.
    AuthThenRedirect { base: String },
    /// A smart-HTTP ref advertisement (protocol v0) that never ends, as fast
    /// as the client reads it.
    EndlessRefs,
    /// A complete ref advertisement of `count` branches `refs/heads/b<n>`.
    Refs { count: usize },
    /// The headers of a ref advertisement at once, then one byte of it every
    /// `interval`, forever.
    Trickle { interval: Duration },
    /// A ref advertisement whose first line is the git protocol's error line
    /// `ERR <message>`.
    ErrLine { message: String },
    /// An HTTP error `status` with `body` (a page no message should quote).
    HttpError { status: u16, body: String },
    /// `200 text/html` with `body`: a web server, not git.
    NotGit { body: String },
    /// Accepts the connection and never says anything.
    Silent,
    /// Sends an ssh identification line, then nothing.
    SshBanner,
}

/// One request a [`HostileServer`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// The `Authorization` header, if the request had one.
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Log {
    connections: usize,
    requests: Vec<Recorded>,
    /// When each connection ended (the client closed it or stopped reading).
    closed: Vec<Instant>,
    /// Bytes written to clients, all connections together.
    sent: u64,
}

/// A misbehaving server on `127.0.0.1:<free port>`.
pub struct HostileServer {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HostileServer {
    /// Starts a server that answers every connection with `behaviour`.
    pub fn start(behaviour: Behaviour) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Log::default()));
        let (shutdown, mut stop) = tokio::sync::oneshot::channel::<()>();
        let served = log.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(format!("hostile-git-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        tokio::select! {
                            _ = &mut stop => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                lock(&served).connections += 1;
                                let (log, behaviour) = (served.clone(), behaviour.clone());
                                tokio::spawn(async move {
                                    let _ = serve(stream, &behaviour, &log).await;
                                    lock(&log).closed.push(Instant::now());
                                });
                            }
                        }
                    }
                });
            })?;
        Ok(Self {
            addr,
            log,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/<repo>.git`.
    pub fn url(&self, repo: &str) -> String {
        format!("http://{}/{repo}.git", self.addr)
    }

    /// `ssh://git@127.0.0.1:PORT/<repo>.git`.
    pub fn ssh_url(&self, repo: &str) -> String {
        format!("ssh://git@{}/{repo}.git", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.log).connections
    }

    /// Requests received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.log).requests.clone()
    }

    /// When each finished connection ended, in the order they ended.
    pub fn closed(&self) -> Vec<Instant> {
        lock(&self.log).closed.clone()
    }

    /// Bytes written to clients so far.
    pub fn bytes_sent(&self) -> u64 {
        lock(&self.log).sent
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// A git packet line: four hex digits of length (including themselves),
/// then the payload.
pub fn pkt_line(payload: &str) -> String {
    format!("{:04x}{payload}", payload.len() + 4)
}

/// The start of a smart-HTTP upload-pack advertisement (protocol v0).
fn advertisement_head() -> String {
    format!("{}0000", pkt_line("# service=git-upload-pack\n"))
}

/// The `n`th ref line of an advertisement; the first carries capabilities.
fn ref_line(n: usize) -> String {
    if n == 0 {
        pkt_line(&format!("{FAKE_COMMIT} refs/heads/main\0ofs-delta\n"))
    } else {
        pkt_line(&format!("{FAKE_COMMIT} refs/heads/b{n:08}\n"))
    }
}

const ADVERTISEMENT: &str = "application/x-git-upload-pack-advertisement";

async fn serve(mut stream: TcpStream, behaviour: &Behaviour, log: &Mutex<Log>) -> io::Result<()> {
    match behaviour {
        Behaviour::Silent => return drain(&mut stream).await,
        Behaviour::SshBanner => {
            write(&mut stream, log, b"SSH-2.0-OpenSSH_9.2p1 Hostile\r\n").await?;
            return drain(&mut stream).await;
        }
        _ => {}
    }
    let Some(request) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let target = request.target.clone();
    let authorized = request.authorization.is_some();
    lock(log).requests.push(request);
    match behaviour {
        Behaviour::AuthThenRedirect { base } if authorized => {
            redirect(&mut stream, log, base, &target).await
        }
        Behaviour::Challenge | Behaviour::AuthThenRedirect { .. } => {
            respond(
                &mut stream,
                log,
                "401 Unauthorized",
                &[("WWW-Authenticate", "Basic realm=\"hostile\"")],
                "text/plain",
                b"authentication required\n",
            )
            .await
        }
        Behaviour::Redirect { base } => redirect(&mut stream, log, base, &target).await,
        Behaviour::Refs { count } => {
            let mut body = advertisement_head();
            for n in 0..*count {
                body.push_str(&ref_line(n));
            }
            body.push_str("0000");
            respond(
                &mut stream,
                log,
                "200 OK",
                &[],
                ADVERTISEMENT,
                body.as_bytes(),
            )
            .await
        }
        Behaviour::EndlessRefs => {
            head(&mut stream, log, ADVERTISEMENT).await?;
            write(&mut stream, log, advertisement_head().as_bytes()).await?;
            let mut n = 0usize;
            loop {
                // 64 lines a write: fast, and it stops as soon as the client does.
                let chunk: String = (n..n + 64).map(ref_line).collect();
                n += 64;
                write(&mut stream, log, chunk.as_bytes()).await?;
            }
        }
        Behaviour::Trickle { interval } => {
            head(&mut stream, log, ADVERTISEMENT).await?;
            let mut pending = advertisement_head().into_bytes();
            let mut n = 0usize;
            loop {
                if pending.is_empty() {
                    pending = ref_line(n).into_bytes();
                    n += 1;
                }
                let byte = pending.remove(0);
                write(&mut stream, log, &[byte]).await?;
                tokio::time::sleep(*interval).await;
            }
        }
        Behaviour::ErrLine { message } => {
            let body = format!(
                "{}{}",
                advertisement_head(),
                pkt_line(&format!("ERR {message}\n"))
            );
            respond(
                &mut stream,
                log,
                "200 OK",
                &[],
                ADVERTISEMENT,
                body.as_bytes(),
            )
            .await
        }
        Behaviour::HttpError { status, body } => {
            respond(
                &mut stream,
                log,
                &format!("{status} Hostile"),
                &[],
                "text/html",
                body.as_bytes(),
            )
            .await
        }
        Behaviour::NotGit { body } => {
            respond(
                &mut stream,
                log,
                "200 OK",
                &[],
                "text/html",
                body.as_bytes(),
            )
            .await
        }
        Behaviour::Silent | Behaviour::SshBanner => Ok(()),
    }
}

async fn redirect(
    stream: &mut TcpStream,
    log: &Mutex<Log>,
    base: &str,
    target: &str,
) -> io::Result<()> {
    let location = format!("{}{target}", base.trim_end_matches('/'));
    respond(
        stream,
        log,
        "302 Found",
        &[("Location", &location)],
        "text/plain",
        b"moved\n",
    )
    .await
}

/// Reads until the client closes the connection (or fails).
async fn drain(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while stream.read(&mut buf).await? > 0 {}
    Ok(())
}

async fn write(stream: &mut TcpStream, log: &Mutex<Log>, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    lock(log).sent += bytes.len() as u64;
    Ok(())
}

/// Response headers for a body of unknown length (it ends when the
/// connection does).
async fn head(stream: &mut TcpStream, log: &Mutex<Log>, content_type: &str) -> io::Result<()> {
    let text = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
    );
    write(stream, log, text.as_bytes()).await
}

async fn respond(
    stream: &mut TcpStream,
    log: &Mutex<Log>,
    status: &str,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let mut text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    write(stream, log, text.as_bytes()).await?;
    write(stream, log, body).await?;
    stream.shutdown().await
}

/// The request line and `Authorization` header of one request (its body,
/// if any, is not read). `None` when the client closed first.
async fn read_request(stream: &mut TcpStream) -> io::Result<Option<Recorded>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("request head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_owned();
    let target = first.next().unwrap_or_default().to_owned();
    let authorization = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_owned())
    });
    Ok(Some(Recorded {
        method,
        target,
        authorization,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_lines() {
        assert_eq!(
            pkt_line("# service=git-upload-pack\n"),
            "001e# service=git-upload-pack\n"
        );
        assert_eq!(
            ref_line(1).len(),
            4 + 40 + 1 + "refs/heads/b00000001\n".len()
        );
    }

    #[tokio::test]
    async fn records_requests_and_redirects() {
        let server = HostileServer::start(Behaviour::Redirect {
            base: "http://127.0.0.1:9".into(),
        })
        .unwrap();
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        stream
            .write_all(b"GET /a.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Zm9v\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 302"), "{answer}");
        assert!(
            answer.contains(
                "Location: http://127.0.0.1:9/a.git/info/refs?service=git-upload-pack\r\n"
            ),
            "{answer}"
        );
        assert_eq!(
            server.requests(),
            [Recorded {
                method: "GET".into(),
                target: "/a.git/info/refs?service=git-upload-pack".into(),
                authorization: Some("Basic Zm9v".into()),
            }]
        );
        assert_eq!(server.connections(), 1);
    }
}
