//! The qemu-style command line.
//!
//! Single-dash options as QEMU spells them. Anything we do not implement is
//! refused by name; nothing is silently ignored except options that have no
//! meaning here and that QEMU users pass by habit (`-nographic`,
//! `-display none`, `-enable-kvm`, `-accel kvm`).

use std::path::PathBuf;

use crate::cpu::CpuModel;
use crate::memory::DEFAULT_HOLE_START;

/// Errors on the command line: each is one line for the user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// An option we do not know or do not implement.
    #[error("option '{0}' is not supported (see --help)")]
    Unsupported(String),
    /// An option without its value.
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    /// A value we cannot use.
    #[error("invalid value '{value}' for {option}: {why}")]
    BadValue {
        /// The option.
        option: String,
        /// What was given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// A required option is absent.
    #[error("{0}")]
    Missing(&'static str),
}

fn bad(option: &str, value: &str, why: impl Into<String>) -> CliError {
    CliError::BadValue {
        option: option.into(),
        value: value.into(),
        why: why.into(),
    }
}

/// Where the guest's serial port is connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialSpec {
    /// The terminal (stdin/stdout).
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A unix socket server; one client at a time gets the console.
    UnixServer(PathBuf),
    /// Disconnected.
    None,
}

/// What to do with incoming migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Listen on / read from this URI at start.
    Uri(String),
    /// Wait for `migrate-incoming`.
    Defer,
}

/// Everything the command line says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd image.
    pub initrd: Option<PathBuf>,
    /// Kernel command line as given.
    pub append: String,
    /// RAM bytes.
    pub mem_size: u64,
    /// Where the 32-bit device hole starts.
    pub hole_start: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// CPU model.
    pub cpu: CpuModel,
    /// Serial port backend.
    pub serial: SerialSpec,
    /// QMP listen specs.
    pub qmp: Vec<String>,
    /// Incoming migration.
    pub incoming: Option<Incoming>,
    /// Start paused (`-S`).
    pub start_paused: bool,
    /// VM name.
    pub name: Option<String>,
    /// Write our pid here.
    pub pidfile: Option<PathBuf>,
    /// Detach from the terminal.
    pub daemonize: bool,
    /// Exit instead of resetting on a guest reboot.
    pub no_reboot: bool,
    /// Back all guest RAM at start (`-mem-prealloc`).
    pub mem_prealloc: bool,
    /// KVM dirty ring entries per vCPU (`-accel kvm,dirty-ring-size=N`;
    /// 0: the dirty bitmap).
    pub dirty_ring_size: u32,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Run a VM.
    Run(Box<Config>),
    /// Print help.
    Help,
    /// Print the version.
    Version,
}

/// Usage text.
pub const USAGE: &str = "\
usage: minivmm -kernel PATH [options]

  -kernel PATH          Linux kernel: ELF vmlinux or bzImage
  -initrd PATH          initramfs
  -append STRING        kernel command line
  -m SIZE               RAM, e.g. 128, 512M, 4G (default 128M; plain numbers are MiB)
  -smp N                number of vCPUs (default 1; also cpus=N)
  -cpu MODEL            minivmm64 (default, a fixed baseline) or host
  -machine [TYPE][,max-ram-below-4g=SIZE][,accel=kvm]
                        TYPE: pc, microvm or minivmm (all the same machine)
  -serial DEV           stdio (default), file:PATH, unix:PATH,server[,nowait], none
  -qmp SPEC             QMP server: unix:PATH,server=on,wait=off or
                        tcp:HOST:PORT,server=on,wait=off (repeatable)
  -incoming URI         wait for a migration: tcp:HOST:PORT, unix:PATH,
                        exec:CMD, file:PATH, or defer (then migrate-incoming)
  -mem-prealloc         back all guest RAM at start (and again before an
                        incoming migration), so first writes take no host fault
  -S                    do not start the vCPUs until 'cont'
  -name NAME            VM name (also guest=NAME)
  -pidfile PATH         write the process id to PATH
  -daemonize            detach after start-up
  -no-reboot            exit when the guest reboots instead of resetting
  -accel kvm[,dirty-ring-size=N]
                        KVM (always); with N, track dirty pages in KVM's
                        per-vCPU dirty ring of N entries (a power of two,
                        1024 or more) instead of the dirty bitmap
  -nographic, -display none, -enable-kvm
                        accepted; minivmm has no display and always uses KVM
  -h, --help            this text
  --version             version
";

/// Parse a size: plain numbers are MiB; suffixes K, M, G, T (binary), B for bytes.
pub fn parse_size(s: &str, option: &str) -> Result<u64, CliError> {
    let s = s.strip_prefix("size=").unwrap_or(s);
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad(option, s, "unknown size suffix")),
            };
            (&s[..i], m)
        }
        _ => (s, 1 << 20),
    };
    let n: u64 = num.parse().map_err(|_| bad(option, s, "not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| bad(option, s, "too large"))
}

fn parse_machine(v: &str, hole: &mut u64) -> Result<(), CliError> {
    for (i, part) in v.split(',').enumerate() {
        let (k, val) = part.split_once('=').unwrap_or(("type", part));
        let k = if i == 0 && !part.contains('=') {
            "type"
        } else {
            k
        };
        match k {
            "type" => match val {
                "pc" | "microvm" | "minivmm" | "q35" => {}
                _ => return Err(bad("-machine", v, format!("unknown machine type '{val}'"))),
            },
            "max-ram-below-4g" => *hole = parse_size(val, "-machine max-ram-below-4g")?,
            "accel" if val == "kvm" => {}
            _ => return Err(bad("-machine", v, format!("unsupported property '{k}'"))),
        }
    }
    Ok(())
}

/// `-accel kvm[,dirty-ring-size=N]`: the dirty ring size (0: none).
fn parse_accel(v: &str) -> Result<u32, CliError> {
    let mut parts = v.split(',');
    if parts.next() != Some("kvm") {
        return Err(bad("-accel", v, "only kvm"));
    }
    let mut ring = 0;
    for p in parts {
        match p.split_once('=') {
            Some(("dirty-ring-size", n)) => {
                ring = n
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n == 0 || (n >= 1024 && n.is_power_of_two()))
                    .ok_or_else(|| {
                        bad(
                            "-accel",
                            v,
                            "dirty-ring-size must be 0 or a power of two, 1024 or more",
                        )
                    })?;
            }
            _ => return Err(bad("-accel", v, format!("unsupported property '{p}'"))),
        }
    }
    Ok(ring)
}

fn parse_serial(v: &str) -> Result<SerialSpec, CliError> {
    match v {
        "stdio" | "mon:stdio" => Ok(SerialSpec::Stdio),
        "none" | "null" => Ok(SerialSpec::None),
        _ => {
            if let Some(p) = v.strip_prefix("file:") {
                return Ok(SerialSpec::File(p.into()));
            }
            if let Some(rest) = v.strip_prefix("unix:") {
                let mut it = rest.split(',');
                let path = it.next().unwrap_or("");
                let mut server = false;
                for o in it {
                    match o {
                        "server" | "server=on" => server = true,
                        "nowait" | "wait=off" => {}
                        _ => return Err(bad("-serial", v, format!("unsupported option '{o}'"))),
                    }
                }
                if !server || path.is_empty() {
                    return Err(bad("-serial", v, "only unix:PATH,server is supported"));
                }
                return Ok(SerialSpec::UnixServer(path.into()));
            }
            Err(bad(
                "-serial",
                v,
                "use stdio, file:PATH, unix:PATH,server or none",
            ))
        }
    }
}

/// Parse `args` (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Action, CliError> {
    let mut it = args.into_iter();
    let mut kernel = None;
    let mut initrd = None;
    let mut append = String::new();
    let mut mem_size = 128u64 << 20;
    let mut hole_start = DEFAULT_HOLE_START;
    let mut vcpus = 1u8;
    let mut cpu = CpuModel::Minivmm64;
    let mut serial = SerialSpec::Stdio;
    let mut qmp = Vec::new();
    let mut incoming = None;
    let mut start_paused = false;
    let mut name = None;
    let mut pidfile = None;
    let mut daemonize = false;
    let mut no_reboot = false;
    let mut dirty_ring_size = 0;
    let mut mem_prealloc = false;

    while let Some(arg) = it.next() {
        let mut value = |o: &str| {
            it.next()
                .ok_or_else(|| CliError::MissingValue(o.to_string()))
        };
        // QEMU accepts --option as -option.
        let opt = if arg.starts_with("--") && arg != "--help" && arg != "--version" {
            &arg[1..]
        } else {
            arg.as_str()
        };
        match opt {
            "-h" | "-help" | "--help" => return Ok(Action::Help),
            "-version" | "--version" => return Ok(Action::Version),
            "-kernel" => kernel = Some(PathBuf::from(value(opt)?)),
            "-initrd" => initrd = Some(PathBuf::from(value(opt)?)),
            "-append" => append = value(opt)?,
            "-m" => {
                let v = value(opt)?;
                mem_size = parse_size(&v, "-m")?;
            }
            "-smp" => {
                let v = value(opt)?;
                let n = v.split(',').next().unwrap_or("");
                let n = n.strip_prefix("cpus=").unwrap_or(n);
                let n: u8 = n
                    .parse()
                    .map_err(|_| bad("-smp", &v, "not a CPU count (1-254)"))?;
                if n == 0 || n > crate::mptable::MAX_VCPUS {
                    return Err(bad("-smp", &v, "the CPU count must be 1 to 254"));
                }
                vcpus = n;
            }
            "-cpu" => {
                let v = value(opt)?;
                cpu = CpuModel::parse(&v).map_err(|e| bad("-cpu", &v, e.to_string()))?;
            }
            "-machine" | "-M" => parse_machine(&value(opt)?, &mut hole_start)?,
            "-serial" => serial = parse_serial(&value(opt)?)?,
            "-qmp" => qmp.push(value(opt)?),
            "-incoming" => {
                let v = value(opt)?;
                incoming = Some(if v == "defer" {
                    Incoming::Defer
                } else {
                    Incoming::Uri(v)
                });
            }
            "-S" => start_paused = true,
            "-name" => {
                let v = value(opt)?;
                let n = v.split(',').next().unwrap_or("");
                name = Some(n.strip_prefix("guest=").unwrap_or(n).to_string());
            }
            "-pidfile" => pidfile = Some(PathBuf::from(value(opt)?)),
            "-daemonize" => daemonize = true,
            "-no-reboot" => no_reboot = true,
            "-mem-prealloc" => mem_prealloc = true,
            "-nographic" | "-enable-kvm" => {}
            "-display" => {
                let v = value(opt)?;
                if v != "none" {
                    return Err(bad("-display", &v, "minivmm has no display; only 'none'"));
                }
            }
            "-accel" => {
                let v = value(opt)?;
                dirty_ring_size = parse_accel(&v)?;
            }
            other => return Err(CliError::Unsupported(other.to_string())),
        }
    }
    let kernel = kernel.ok_or(CliError::Missing(
        "no kernel given: use -kernel PATH (see --help)",
    ))?;
    if daemonize && serial == SerialSpec::Stdio {
        return Err(bad("-daemonize", "", "cannot be used with -serial stdio"));
    }
    Ok(Action::Run(Box::new(Config {
        kernel,
        initrd,
        append,
        mem_size,
        hole_start,
        vcpus,
        cpu,
        serial,
        qmp,
        incoming,
        start_paused,
        name,
        pidfile,
        daemonize,
        no_reboot,
        mem_prealloc,
        dirty_ring_size,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Action, CliError> {
        parse(s.split_whitespace().map(String::from))
    }

    fn cfg(s: &str) -> Config {
        match p(s).unwrap() {
            Action::Run(c) => *c,
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512", "-m").unwrap(), 512 << 20);
        assert_eq!(parse_size("512M", "-m").unwrap(), 512 << 20);
        assert_eq!(parse_size("4G", "-m").unwrap(), 4 << 30);
        assert_eq!(parse_size("size=1g", "-m").unwrap(), 1 << 30);
        assert!(parse_size("12Q", "-m").is_err());
        assert!(parse_size("abc", "-m").is_err());
        assert!(parse_size("99999999999999T", "-m").is_err());
    }

    #[test]
    fn options() {
        let c = cfg("-kernel k -initrd i -m 256M -smp 2 -S -no-reboot -mem-prealloc -qmp unix:/q,server=on,wait=off -incoming defer -machine pc,max-ram-below-4g=1G -nographic -display none -accel kvm");
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!(c.vcpus, 2);
        assert!(c.start_paused && c.no_reboot && c.mem_prealloc);
        assert_eq!(c.incoming, Some(Incoming::Defer));
        assert_eq!(c.hole_start, 1 << 30);
        assert_eq!(c.qmp.len(), 1);
        assert_eq!(c.dirty_ring_size, 0);
        assert_eq!(
            cfg("-kernel k -accel kvm,dirty-ring-size=4096").dirty_ring_size,
            4096
        );
        for bad in [
            "kvm,dirty-ring-size=1000",
            "kvm,dirty-ring-size=512",
            "kvm,foo=1",
            "tcg",
        ] {
            assert!(p(&format!("-kernel k -accel {bad}")).is_err(), "{bad}");
        }
        assert_eq!(
            cfg("-kernel k -serial file:/tmp/x").serial,
            SerialSpec::File("/tmp/x".into())
        );
        assert_eq!(p("--help").unwrap(), Action::Help);
        assert_eq!(p("--version").unwrap(), Action::Version);
    }

    #[test]
    fn errors() {
        assert_eq!(
            p("-kernel k -smp 0").unwrap_err().to_string(),
            "invalid value '0' for -smp: the CPU count must be 1 to 254"
        );
        assert!(
            matches!(p("-kernel k -device virtio-net"), Err(CliError::Unsupported(o)) if o == "-device")
        );
        assert!(matches!(p("-kernel"), Err(CliError::MissingValue(_))));
        assert!(matches!(p("-m 12"), Err(CliError::Missing(_))));
        assert!(p("-kernel k -m 1X").is_err());
        assert!(p("-kernel k -machine foo").is_err());
        assert!(p("-kernel k -machine pc,smm=on").is_err());
        assert!(p("-kernel k -display gtk").is_err());
        assert!(p("-kernel k -serial tcp:1:2").is_err());
        assert!(p("-kernel k -daemonize").is_err());
    }
}
