//! Benchmark: one git poll cycle over many repositories.
//!
//! `cargo bench -p kapsa-operator --bench poll_cycle -- [--repos N] [--branches B] [--runs R]`
//! (defaults 500 repositories, 20 branches each, 3 runs).
//!
//! A [`GitServer`] (real `git http-backend` behind a small HTTP server on
//! loopback, in this process) serves N bare repositories of B branches each:
//! one repository is made with the git command line, and its bare directory
//! is copied N times under the server's root. A cycle lists every
//! repository once with the operator's own `git::list_branches`, every
//! listing holding a slot of the poller's own [`PollSlots`], and checks that
//! each listing returned B branches.
//!
//! Two concurrency settings are measured:
//! - `poller`: the poller's limits, 16 listings at once in all and 4 per
//!   git host. All N repositories are on one host here (127.0.0.1:PORT), so
//!   the per-host limit binds: this is the time to poll N repositories of
//!   *one* host, at most 4 at a time. With repositories spread over 4 or
//!   more hosts the global limit of 16 is what binds instead.
//! - `no host cap`: the per-host limit lifted, 16 at once (the global limit
//!   only): what N repositories spread over many hosts would take, if the
//!   server kept up.
//!
//! For each cycle: the wall time, and the CPU time (user + system,
//! getrusage) of this process (`RUSAGE_SELF`) and of its waited-for
//! children (`RUSAGE_CHILDREN`: the server's `git http-backend` processes
//! and their `git upload-pack`). The in-process server's own thread (the
//! HTTP server that pipes each request to its CGI process) runs in this
//! process; its CPU time is read from `/proc/self/task/<tid>/stat` and
//! shown apart, and `client` is this process's time without it: what the
//! operator itself spends. Figures are medians of the runs (each column its
//! own median), after one warm-up cycle per setting.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kapsa_operator::git::{HostPolicy, ListOptions, list_branches};
use kapsa_operator::poller::{MAX_CONCURRENT_POLLS, MAX_CONCURRENT_POLLS_PER_HOST, PollSlots};
use kapsa_testenv::git_server::{DEFAULT_BRANCH, GitServer};

struct Args {
    repos: usize,
    branches: usize,
    runs: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench -p kapsa-operator --bench poll_cycle -- [--repos N] [--branches B] [--runs R]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        repos: 500,
        branches: 20,
        runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let slot = match name.as_str() {
            "--repos" => &mut args.repos,
            "--branches" => &mut args.branches,
            "--runs" => &mut args.runs,
            // cargo passes `--bench` to harness-less benches.
            "--bench" => continue,
            _ => {
                eprintln!("unknown argument {arg:?}");
                usage()
            }
        };
        let value = inline.or_else(|| it.next()).unwrap_or_else(|| usage());
        *slot = match value.parse() {
            Ok(v) if v > 0 => v,
            _ => {
                eprintln!("{name} wants a positive number, not {value:?}");
                usage()
            }
        };
    }
    args
}

/// CPU time (user + system) of this process and of its waited-for children.
#[allow(unsafe_code)]
fn rusage() -> (Duration, Duration) {
    fn cpu(who: libc::c_int) -> Duration {
        // SAFETY: getrusage only writes the struct it is given, which is
        // plain data and zero-initialised here.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::getrusage(who, &mut usage) };
        assert_eq!(rc, 0, "getrusage failed");
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        tv(usage.ru_utime) + tv(usage.ru_stime)
    }
    (cpu(libc::RUSAGE_SELF), cpu(libc::RUSAGE_CHILDREN))
}

/// The thread (by name prefix) of this process, as `/proc/self/task/<tid>`.
fn find_thread(prefix: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim().starts_with(prefix))
        })
}

/// CPU time (user + system) of one thread, from its `stat` (clock ticks).
#[allow(unsafe_code)]
fn thread_cpu(task: &Path) -> Option<Duration> {
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    // The fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after `)`.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Cycle {
    wall: Duration,
    client: Duration,
    server_thread: Duration,
    process: Duration,
    children: Duration,
}

async fn cycle(
    urls: &Arc<Vec<String>>,
    branches: usize,
    slots: Arc<PollSlots>,
    options: &Arc<ListOptions>,
    server_thread: Option<&Path>,
) -> anyhow::Result<Cycle> {
    let thread_before = server_thread.and_then(thread_cpu).unwrap_or_default();
    let (self_before, children_before) = rusage();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(urls.len());
    for i in 0..urls.len() {
        let (urls, slots, options) = (urls.clone(), slots.clone(), options.clone());
        tasks.push(tokio::spawn(async move {
            let url = &urls[i];
            let _slot = slots.acquire(url).await;
            list_branches(url, None, &options).await
        }));
    }
    let mut failures = 0;
    let mut first_failure = None;
    for task in tasks {
        match task.await? {
            Ok(heads) if heads.branches.len() == branches => {}
            Ok(heads) => {
                failures += 1;
                first_failure.get_or_insert(format!(
                    "{} branches instead of {branches}",
                    heads.branches.len()
                ));
            }
            Err(e) => {
                failures += 1;
                first_failure.get_or_insert(e.to_string());
            }
        }
    }
    let wall = started.elapsed();
    let (self_after, children_after) = rusage();
    let thread_after = server_thread.and_then(thread_cpu).unwrap_or_default();
    anyhow::ensure!(
        failures == 0,
        "{failures} of {} listings failed; the first: {}",
        urls.len(),
        first_failure.unwrap_or_default()
    );
    let process = self_after.saturating_sub(self_before);
    let server = thread_after.saturating_sub(thread_before);
    Ok(Cycle {
        wall,
        client: process.saturating_sub(server),
        server_thread: server,
        process,
        children: children_after.saturating_sub(children_before),
    })
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let server = GitServer::start(None).await?;
    let setup = Instant::now();
    let template = server.create_repo("template")?;
    template.commit(DEFAULT_BRANCH, "README", "hello\n", "first")?;
    for b in 1..args.branches {
        template.commit(
            &format!("feature/branch-{b}"),
            "README",
            format!("branch {b}\n"),
            &format!("branch {b}"),
        )?;
    }
    let listed = template.branches()?;
    anyhow::ensure!(
        listed.len() == args.branches,
        "the template has {} branches, not {}",
        listed.len(),
        args.branches
    );
    let mut urls = Vec::with_capacity(args.repos);
    for i in 0..args.repos {
        let name = format!("repo-{i:05}");
        copy_dir(
            template.bare_path(),
            &server.root().join(format!("{name}.git")),
        )?;
        urls.push(server.url(&name));
    }
    let urls = Arc::new(urls);
    let setup = setup.elapsed();
    let port = server.addr().port();
    // The server's thread is `git-server-<port>` (a thread name is cut to
    // 15 bytes in /proc): the only one of that name here.
    let server_thread = find_thread("git-server-");
    let options =
        Arc::new(ListOptions::new(Duration::from_secs(30)).with_hosts(HostPolicy::loopback()));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "poll cycle: {} repositories x {} branches on one host (git http-backend on 127.0.0.1:{port}), \
         {} runs per setting, median shown; {cores} CPU cores; setup {:.1}s",
        args.repos,
        args.branches,
        args.runs,
        setup.as_secs_f64()
    );
    if server_thread.is_none() {
        println!(
            "(the server thread was not found: `server thr` reads 0, `client` is the whole process)"
        );
    }

    let settings: [(&str, Option<usize>); 2] = [
        ("poller (16, 4/host)", Some(MAX_CONCURRENT_POLLS_PER_HOST)),
        ("no host cap (16)", None),
    ];
    let mut rows = Vec::new();
    for (label, per_host) in settings {
        let slots = || Arc::new(PollSlots::new(MAX_CONCURRENT_POLLS, per_host));
        // Warm-up: page cache, connection set-up code paths.
        cycle(
            &urls,
            args.branches,
            slots(),
            &options,
            server_thread.as_deref(),
        )
        .await?;
        let mut runs = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            runs.push(
                cycle(
                    &urls,
                    args.branches,
                    slots(),
                    &options,
                    server_thread.as_deref(),
                )
                .await?,
            );
        }
        let column = |f: fn(&Cycle) -> Duration| median(runs.iter().map(f).collect());
        let wall = column(|c| c.wall);
        rows.push((
            label,
            wall,
            args.repos as f64 / wall.as_secs_f64(),
            column(|c| c.client),
            column(|c| c.server_thread),
            column(|c| c.process),
            column(|c| c.children),
        ));
    }

    println!();
    println!(
        "{:<20} {:>8} {:>10} {:>10} {:>11} {:>10} {:>12}",
        "concurrency", "wall s", "repos/s", "client s", "server thr", "self s", "children s"
    );
    for (label, wall, rate, client, thread, process, children) in rows {
        println!(
            "{label:<20} {:>8} {rate:>10.0} {:>10} {:>11} {:>10} {:>12}",
            secs(wall),
            secs(client),
            secs(thread),
            secs(process),
            secs(children)
        );
    }
    println!();
    println!(
        "wall: one cycle; client = self - server thr: CPU of this process without the in-process \
         git server's thread (the operator's share: listing, TLS-less HTTP, parsing); server thr: \
         that thread; self: getrusage(RUSAGE_SELF) user+sys; children: getrusage(RUSAGE_CHILDREN) \
         user+sys, the git http-backend / upload-pack processes. All N repositories are on one host, \
         so the poller's per-host cap of {MAX_CONCURRENT_POLLS_PER_HOST} binds and its row is the \
         time for one host's N repositories; the second row lifts that cap (global {MAX_CONCURRENT_POLLS} only)."
    );
    drop(template);
    drop(server);
    Ok(())
}
