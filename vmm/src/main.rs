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
mod sandbox;
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

/// `-msg timestamp=on`: each message starts with the UTC time, as QEMU's.
static TIMESTAMPS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Print one message of minivmm's to stderr.
fn report(msg: std::fmt::Arguments<'_>) {
    if TIMESTAMPS.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("{} minivmm: {msg}", utc_now());
    } else {
        eprintln!("minivmm: {msg}");
    }
}

/// The time now as QEMU's `-msg timestamp=on` writes it:
/// `2026-12-02T08:30:05.123456Z`.
fn utc_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
            && ["migration", "minivmm", "devices", "qmp"]
                .iter()
                .any(|c| metadata.target().split("::").next() == Some(*c))
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            report(*record.args());
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
            report(format_args!("{e}"));
            return ExitCode::from(2);
        }
    };
    let config = match action {
        cli::Action::Help => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        cli::Action::Version => {
            // Honest: minivmm's own version (QMP's query-version says the
            // same); QEMU's layout, so scripts that read the first line work.
            println!(
                "minivmm version {} (a KVM VMM with QEMU 7.2's command line and QMP)\n\
                 Copyright (c) 2026 the minivmm developers",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        cli::Action::MachineHelp => {
            print!("{}", cli::MACHINE_HELP);
            return ExitCode::SUCCESS;
        }
        cli::Action::CpuHelp => {
            print!("{}", cli::CPU_HELP);
            return ExitCode::SUCCESS;
        }
        cli::Action::Run(c) => c,
    };
    TIMESTAMPS.store(config.msg_timestamp, std::sync::atomic::Ordering::Relaxed);
    match control::run(*config) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report(format_args!("{}", migration::error_chain(&e)));
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
