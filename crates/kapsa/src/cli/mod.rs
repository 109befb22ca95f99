//! The application developer's verbs of `kapsa` (also `kubectl kapsa`):
//! `projects`, `status`, `logs`, `open`, `rollback`, `unpin`, `create
//! project` and `completion`.
//!
//! Every verb talks to the cluster of the current kubeconfig context
//! (`--context`, `--kubeconfig`), prints a table for people and JSON or YAML
//! for scripts (`-o`), and turns the API server's refusals into errors that
//! say what to do ([`error`]).

mod cluster;
mod completion;
mod create;
mod error;
mod logs;
mod lookup;
mod open;
mod output;
mod projects;
mod rollback;
mod status;

use std::ffi::OsString;
use std::path::Path;

use clap::{ArgMatches, Command, Subcommand};

/// The name the binary has when `kubectl` runs it as a plugin.
pub const PLUGIN_FILE_NAME: &str = "kubectl-kapsa";

/// The verbs, flattened into the binary's top-level subcommands.
#[derive(Subcommand)]
pub enum AppCommand {
    /// List Projects: host, readiness, commit, environments, age.
    Projects(projects::ProjectsArgs),
    /// Show a Project: its Environments, what is not OK and why, recent
    /// Events, the build in progress.
    Status(status::StatusArgs),
    /// Print the logs of a Project's app (every replica) or of its build.
    Logs(logs::LogsArgs),
    /// Print the URL of an Environment and open it in a browser if there is one.
    Open(open::OpenArgs),
    /// Run an earlier release of an Environment (pins it: new commits are
    /// built but not rolled out until `unpin`).
    Rollback(rollback::RollbackArgs),
    /// Remove an Environment's pin: the newest build rolls out again.
    Unpin(rollback::UnpinArgs),
    /// Create a Kapsa object (server-side apply, field manager `kapsa-cli`).
    Create {
        #[command(subcommand)]
        what: create::CreateCommand,
    },
    /// Print a shell completion script (bash, zsh or fish).
    Completion(completion::CompletionArgs),
}

/// Runs one verb; never returns on error: prints `error: …` to stderr and
/// exits with the error's code (see [`error::exit_code`]).
///
/// `root` builds the binary's whole clap command (for completions).
pub fn run(command: AppCommand, root: fn() -> Command) -> anyhow::Result<()> {
    let result = match command {
        AppCommand::Completion(args) => completion::run(&args, root),
        command => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(run_async(command))),
    };
    match result {
        Ok(()) => Ok(()),
        Err(err) => {
            eprintln!("error: {}", error::render(&err));
            std::process::exit(error::exit_code(&err));
        }
    }
}

async fn run_async(command: AppCommand) -> anyhow::Result<()> {
    match command {
        AppCommand::Projects(args) => projects::run(args).await,
        AppCommand::Status(args) => status::run(args).await,
        AppCommand::Logs(args) => logs::run(args).await,
        AppCommand::Open(args) => open::run(args).await,
        AppCommand::Rollback(args) => rollback::rollback(args).await,
        AppCommand::Unpin(args) => rollback::unpin(args).await,
        AppCommand::Create { what } => create::run(what).await,
        AppCommand::Completion(_) => unreachable!("handled without a runtime"),
    }
}

/// The name to show in help and usage: `kubectl kapsa` when the binary was
/// started as `kubectl-kapsa` (a kubectl plugin), else `kapsa`.
pub fn display_name(argv0: Option<&OsString>) -> &'static str {
    if is_plugin(argv0) {
        "kubectl kapsa"
    } else {
        "kapsa"
    }
}

/// True when argv[0]'s file name is `kubectl-kapsa`.
pub fn is_plugin(argv0: Option<&OsString>) -> bool {
    argv0
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|name| name == PLUGIN_FILE_NAME)
}

/// Parses the command line into `P`, naming the program after argv[0]:
/// invoked as `kubectl-kapsa` (kubectl runs plugins so), usage and help
/// read `kubectl kapsa …`; the verbs are the same.
pub fn parse<P: clap::Parser>() -> P {
    let argv0 = std::env::args_os().next();
    let mut command = P::command().bin_name(display_name(argv0.as_ref()));
    let matches: ArgMatches = command.get_matches_mut();
    match P::from_arg_matches(&matches) {
        Ok(parsed) => parsed,
        Err(err) => err.format(&mut command).exit(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_name_is_recognised_from_any_path() {
        assert!(is_plugin(Some(&OsString::from(
            "/home/me/.local/bin/kubectl-kapsa"
        ))));
        assert!(is_plugin(Some(&OsString::from("kubectl-kapsa"))));
        assert!(!is_plugin(Some(&OsString::from("/usr/bin/kapsa"))));
        assert!(!is_plugin(Some(&OsString::from("kubectl-kapsa-old"))));
        assert!(!is_plugin(None));
        assert_eq!(
            display_name(Some(&OsString::from("./kubectl-kapsa"))),
            "kubectl kapsa"
        );
        assert_eq!(display_name(Some(&OsString::from("kapsa"))), "kapsa");
    }
}
