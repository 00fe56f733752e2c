//! `ztrust-lab`: the payments lab (or any manifests) as network namespaces on this machine, with the
//! real agent enforcing. A separate binary from the agent: the DaemonSet image carries no lab code.

use clap::Parser;
use ztrust_lab::cli::{self, LabCommand};

/// A Kubernetes node made of network namespaces, to try policies on (root: it makes namespaces, and
/// its agent loads eBPF programs).
#[derive(Parser)]
#[command(name = "ztrust-lab", version)]
struct Cli {
    #[command(subcommand)]
    command: LabCommand,
}

fn main() {
    match cli::run(Cli::parse().command) {
        Ok(()) => {}
        // `explain` printed its answer; the status says what it found.
        Err(cli::CliError::Explained(_, code)) => std::process::exit(code),
        Err(e) => {
            let code = if matches!(
                e,
                cli::CliError::Explain(_) | cli::CliError::Draft(_) | cli::CliError::Manifests { .. }
            ) {
                2
            } else {
                1
            };
            eprintln!("Error: {:#}", anyhow::Error::from(e));
            std::process::exit(code)
        }
    }
}
