//! `kplab`: the lab's command line. Every command works on the running lab (`/run/<lab name>`);
//! none of them builds anything.
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "A Kubernetes cluster modelled with network namespaces, for trying Services before deploying them"
)]
struct Cli {
    #[command(subcommand)]
    command: kplab::LabCmd,
}

fn main() -> std::process::ExitCode {
    match kplab::main(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kplab: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
