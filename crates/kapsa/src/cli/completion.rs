//! `kapsa completion bash|zsh|fish`: a shell completion script on stdout.

use clap::{Args, Command};
use clap_complete::Shell;

use super::output::emit;
use super::{PLUGIN_FILE_NAME, is_plugin};

#[derive(Args)]
pub struct CompletionArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    shell: Shell,
}

pub fn run(args: &CompletionArgs, root: fn() -> Command) -> anyhow::Result<()> {
    // Completes the name the binary was started as: `kapsa`, or
    // `kubectl-kapsa` for the plugin's own completion.
    let name = if is_plugin(std::env::args_os().next().as_ref()) {
        PLUGIN_FILE_NAME
    } else {
        "kapsa"
    };
    let mut command = root();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, name, &mut script);
    emit(&String::from_utf8(script)?);
    Ok(())
}
