//! minivmm: a small KVM virtual machine monitor with a QEMU-style command
//! line, QMP, and live migration (precopy, postcopy, COLO).

mod boot;
mod cli;
mod control;
mod cpu;
mod dirty_ring;
mod dirtylimit;
mod dirtyrate;
mod memory;
mod migrate;
mod mptable;
mod term;
mod throttle;
mod vcpu;
mod vm;

use std::process::ExitCode;

/// Prints the workspace crates' log records (the migration library's
/// warnings and errors) to stderr as minivmm's own messages are printed:
/// `minivmm: ` and the message. Records of other crates (dependencies)
/// are not shown, as before the library logged through `log`.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
            && ["migration", "minivmm", "devices", "qmp"]
                .iter()
                .any(|c| metadata.target().split("::").next() == Some(*c))
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("minivmm: {}", record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn main() -> ExitCode {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
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

#[cfg(test)]
mod tests {
    use log::Log;

    /// The workspace crates' records are shown (the migration library's
    /// warnings among them), dependencies' and debug records are not.
    #[test]
    fn logger_shows_the_workspace_crates_records() {
        let shown = |target: &str, level| {
            super::LOGGER.enabled(&log::Metadata::builder().target(target).level(level).build())
        };
        assert!(shown("migration::colo", log::Level::Warn));
        assert!(shown("migration::session", log::Level::Error));
        assert!(shown("minivmm::control", log::Level::Info));
        assert!(!shown("migration::session", log::Level::Debug));
        assert!(!shown("mio::poll", log::Level::Warn));
        assert!(!shown("migrationx", log::Level::Warn));
    }
}
