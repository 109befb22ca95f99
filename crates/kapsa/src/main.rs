//! `kapsa`: the one binary of Kapsa.

mod cli;
mod demo;
mod dev;
mod operator;

use clap::{CommandFactory, Parser, Subcommand};

/// jemalloc rather than glibc's malloc: at 1,000 Projects glibc kept about
/// 50 MiB of freed memory in its per-thread arenas on top of an 81 MiB heap
/// (docs/benchmarks.md); jemalloc hands freed pages back (after its decay
/// time) and fragments less across the runtime's threads.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
