//! `kapsa`: the one binary of Kapsa.

mod cli;
mod demo;
mod dev;
mod operator;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kapsa",
    version,
    about = "Kapsa: a Kubernetes-native platform-as-a-service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print Kapsa's CustomResourceDefinitions as one YAML stream.
    Crds,
    /// Run the operator (in a cluster, or against any kubeconfig).
    Operator(operator::OperatorArgs),
    /// A local control plane for trying Kapsa out and developing it.
    Dev {
        #[command(subcommand)]
        command: dev::DevCommand,
    },
    #[command(flatten)]
    App(cli::AppCommand),
}

fn main() -> anyhow::Result<()> {
    // Also `kubectl kapsa`: a symlink named kubectl-kapsa (see docs/cli.md).
    let cli: Cli = cli::parse();
    match cli.command {
        Command::Crds => {
            print!("{}", kapsa_api::crds_yaml());
            Ok(())
        }
        Command::Operator(args) => operator::run(args),
        Command::Dev { command } => dev::run(command),
        Command::App(command) => cli::run(command, Cli::command),
    }
}
