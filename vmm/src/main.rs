//! minivmm: a small KVM virtual machine monitor with a QEMU-style command
//! line, QMP, and live migration (precopy, postcopy, COLO).

mod boot;
mod cli;
mod control;
mod cpu;
mod memory;
mod migrate;
mod mptable;
mod term;
mod vcpu;
mod vm;

use std::process::ExitCode;

fn main() -> ExitCode {
    let action = match cli::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("minivmm: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match action {
        cli::Action::Help => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        cli::Action::Version => {
            println!("minivmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        cli::Action::Run(c) => c,
    };
    match control::run(*config) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("minivmm: {}", migration::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
