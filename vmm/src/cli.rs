//! The qemu-style command line.
//!
//! Single-dash options as QEMU spells them, including the forms management
//! tools write (libvirt: `-chardev socket,...` + `-mon chardev=...`,
//! `-chardev pty,...` + `-device isa-serial,chardev=...`, `-machine
//! pc,usb=off,dump-guest-core=off`, `-smp N,sockets=..,cores=..,threads=..`,
//! `-m size=..`, `-uuid`, `-rtc base=utc`, `-no-shutdown`, ...). Anything we
//! do not implement is refused by name; nothing is silently ignored except
//! options that are no-ops in QEMU too for a direct-kernel-boot guest
//! without disks, network or USB (`-nographic`, `-display none`,
//! `-enable-kvm`, `-accel kvm`, `-no-user-config`, `-boot strict=on`,
//! `-overcommit mem-lock=off`, `-machine usb=off`).

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
    /// A pseudo-terminal (`-chardev pty`): its name is printed at start
    /// as QEMU does and shown by `query-chardev`.
    Pty,
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
    /// QMP monitors (`-qmp`, `-mon mode=control`): listen specs or `stdio`.
    pub qmp: Vec<String>,
    /// Human monitors (`-monitor`, `-mon mode=readline`): the same.
    pub hmp: Vec<String>,
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
    /// `-uuid`.
    pub uuid: Option<String>,
    /// `-no-shutdown`: a guest power-off stops the guest (state
    /// `shutdown`) instead of ending the process.
    pub no_shutdown: bool,
    /// `-machine dump-guest-core=off`: guest RAM is left out of core dumps.
    pub dump_guest_core: bool,
    /// `-msg timestamp=on`: log lines start with the time.
    pub msg_timestamp: bool,
    /// Serial console's chardev id (`-chardev ...,id=X` + `-device
    /// isa-serial,chardev=X`), for `query-chardev`.
    pub serial_label: String,
    /// `-sandbox` (on by default).
    pub sandbox: crate::sandbox::SandboxSpec,
    /// `-object tls-creds-x509,...`: TLS credentials for migrations.
    pub tls_creds: Vec<TlsCredsSpec>,
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
    /// `-machine help`: the machine types.
    MachineHelp,
    /// `-cpu help`: the CPU models.
    CpuHelp,
}

/// `-machine help`, in QEMU's layout.
pub const MACHINE_HELP: &str = "\
Supported machines are:
minivmm              minivmm PC: KVM, in-kernel irqchip and PIT, one 8250 serial port (default)
pc                   minivmm PC (alias of minivmm; also pc-i440fx-X.Y)
q35                  minivmm PC (alias of minivmm; also pc-q35-X.Y)
microvm              minivmm PC (alias of minivmm)
";

/// `-cpu help`, in QEMU's layout.
pub const CPU_HELP: &str = "\
Available CPUs:
x86 minivmm64             minivmm baseline x86-64 CPU (default; migratable between hosts)
x86 host                  KVM processor with all supported host features
";

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
  -serial DEV           stdio (default), file:PATH, pty, none
  -qmp SPEC             QMP server: unix:PATH,server=on,wait=off,
                        tcp:HOST:PORT,server=on,wait=off or stdio (repeatable)
  -monitor SPEC         human monitor (HMP, prompt '(qemu) ') on the same
                        SPECs, or none; a monitor on stdio makes the default
                        serial console none
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
  -chardev BACKEND,id=ID[,...]
                        socket,path=P,server=on,wait=off | socket,host=H,port=N,server=on,wait=off
                        | pty | file,path=P | stdio | null: for -mon and -device isa-serial
  -mon chardev=ID[,id=..][,mode=control|readline]
                        a QMP (control) or human (readline) monitor on that
                        chardev (a socket or stdio)
  -device isa-serial,chardev=ID[,id=..][,index=0]
                        the serial console (minivmm's one 8250 port) on that chardev
  -uuid UUID            the VM's UUID (query-uuid)
  -no-shutdown          a guest power-off stops the guest instead of exiting
  -nodefaults           no default serial console (only what -serial/-device add)
  -rtc base=utc         the RTC runs on UTC (the only choice)
  -msg timestamp=on|off time stamps on minivmm's log lines
  -machine ...,usb=off,dump-guest-core=on|off
                        no USB (usb=on is refused); dump-guest-core=off keeps
                        guest RAM out of core dumps
  -sandbox on|off[,obsolete=allow|deny][,elevateprivileges=allow|deny]
           [,spawn=allow|deny][,resourcecontrol=allow|deny]
                        seccomp filters (on by default; see docs/security.md)
  -object tls-creds-x509,id=ID,dir=DIR,endpoint=client|server[,verify-peer=on|off]
                        TLS credentials (QEMU's file names in DIR) for a
                        migration with migrate-set-parameters tls-creds=ID
  -nographic, -display none, -enable-kvm, -no-user-config, -boot strict=on|off,
  -overcommit mem-lock=off
                        accepted: no-ops for this machine, as in QEMU
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

/// The machine types minivmm answers to (all the same machine): its own,
/// and the names tools write for a PC (`pc`, libvirt's versioned
/// `pc-i440fx-X.Y`, `q35`, `microvm`).
pub fn machine_type_ok(t: &str) -> bool {
    matches!(t, "pc" | "microvm" | "minivmm" | "q35")
        || t.strip_prefix("pc-i440fx-")
            .or_else(|| t.strip_prefix("pc-q35-"))
            .is_some_and(|v| !v.is_empty())
}

/// An on/off switch value as QEMU spells them.
/// `-object tls-creds-x509,id=ID,dir=DIR,endpoint=client|server[,verify-peer=on|off]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCredsSpec {
    /// The object's id (`tls-creds` names it).
    pub id: String,
    /// The credentials directory (QEMU's file names).
    pub dir: PathBuf,
    /// Which side it is for.
    pub endpoint: migration::tls::Endpoint,
    /// Verify the peer (default on, as QEMU).
    pub verify_peer: bool,
}

/// `-object TYPE,...`: only `tls-creds-x509`.
fn parse_object(v: &str) -> Result<TlsCredsSpec, CliError> {
    let mut parts = v.split(',');
    let kind = parts.next().unwrap_or("");
    let kind = kind.strip_prefix("qom-type=").unwrap_or(kind);
    if kind != "tls-creds-x509" {
        return Err(bad(
            "-object",
            v,
            format!("type '{kind}' is not supported (tls-creds-x509 is)"),
        ));
    }
    let (mut id, mut dir, mut endpoint, mut verify_peer) = (None, None, None, true);
    for p in parts {
        match p.split_once('=') {
            Some(("id", x)) => id = Some(x.to_string()),
            Some(("dir", x)) => dir = Some(PathBuf::from(x)),
            Some(("endpoint", "client")) => endpoint = Some(migration::tls::Endpoint::Client),
            Some(("endpoint", "server")) => endpoint = Some(migration::tls::Endpoint::Server),
            Some(("endpoint", x)) => {
                return Err(bad(
                    "-object",
                    v,
                    format!("endpoint '{x}': client or server"),
                ))
            }
            Some(("verify-peer", x)) => verify_peer = on_off("-object", v, x)?,
            _ => return Err(bad("-object", v, format!("unsupported property '{p}'"))),
        }
    }
    Ok(TlsCredsSpec {
        id: id.ok_or_else(|| bad("-object", v, "no id"))?,
        dir: dir.ok_or_else(|| bad("-object", v, "no dir (the credentials' directory)"))?,
        endpoint: endpoint.unwrap_or(migration::tls::Endpoint::Client),
        verify_peer,
    })
}

fn on_off(option: &str, v: &str, val: &str) -> Result<bool, CliError> {
    match val {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(bad(option, v, format!("'{val}' is not on or off"))),
    }
}

fn parse_machine(v: &str, hole: &mut u64, dump_core: &mut bool) -> Result<(), CliError> {
    for (i, part) in v.split(',').enumerate() {
        let (k, val) = part.split_once('=').unwrap_or(("type", part));
        let k = if i == 0 && !part.contains('=') {
            "type"
        } else {
            k
        };
        match k {
            "type" if machine_type_ok(val) => {}
            "type" => {
                return Err(bad(
                    "-machine",
                    v,
                    format!("unknown machine type '{val}' (-machine help)"),
                ))
            }
            "max-ram-below-4g" => *hole = parse_size(val, "-machine max-ram-below-4g")?,
            "accel" if val == "kvm" => {}
            "usb" if !on_off("-machine", v, val)? => {}
            "usb" => return Err(bad("-machine", v, "minivmm has no USB controller")),
            "dump-guest-core" => *dump_core = on_off("-machine", v, val)?,
            _ => return Err(bad("-machine", v, format!("unsupported property '{k}'"))),
        }
    }
    Ok(())
}

/// `-smp [cpus=]N[,sockets=S][,dies=D][,cores=C][,threads=T][,maxcpus=M]`.
/// minivmm presents its vCPUs as the cores of one socket, one thread each
/// (CPUID leaves 1 and 4): a topology that says otherwise is refused, not
/// half-read.
fn parse_smp(v: &str) -> Result<u8, CliError> {
    let mut cpus = None;
    let mut topo = [None::<u64>; 5]; // sockets, dies, cores, threads, maxcpus
    for (i, part) in v.split(',').enumerate() {
        let (k, val) = match part.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => ("cpus", part),
            None => return Err(bad("-smp", v, format!("'{part}' is not key=value"))),
        };
        let n: u64 = val
            .parse()
            .map_err(|_| bad("-smp", v, format!("{k}: '{val}' is not a number")))?;
        let slot = match k {
            "cpus" => &mut cpus,
            "sockets" => &mut topo[0],
            "dies" => &mut topo[1],
            "cores" => &mut topo[2],
            "threads" => &mut topo[3],
            "maxcpus" => &mut topo[4],
            _ => return Err(bad("-smp", v, format!("unsupported property '{k}'"))),
        };
        *slot = Some(n);
    }
    let [sockets, dies, cores, threads, maxcpus] = topo;
    let n = cpus.unwrap_or_else(|| {
        sockets.unwrap_or(1) * dies.unwrap_or(1) * cores.unwrap_or(1) * threads.unwrap_or(1)
    });
    if n == 0 || n > u64::from(crate::mptable::MAX_VCPUS) {
        return Err(bad("-smp", v, "the CPU count must be 1 to 254"));
    }
    if maxcpus.is_some_and(|m| m != n) {
        return Err(bad(
            "-smp",
            v,
            "maxcpus must equal the CPU count: minivmm has no CPU hotplug",
        ));
    }
    let one = |x: Option<u64>| x.is_none_or(|x| x == 1);
    if !one(sockets) || !one(dies) || !one(threads) || cores.is_some_and(|c| c != n) {
        return Err(bad(
            "-smp",
            v,
            format!(
                "minivmm presents its vCPUs as the cores of one socket, one thread each: \
                 use -smp {n},sockets=1,cores={n},threads=1"
            ),
        ));
    }
    u8::try_from(n).map_err(|_| bad("-smp", v, "the CPU count must be 1 to 254"))
}

/// `-m [size=]SIZE[,slots=N,maxmem=SIZE]`: memory hotplug is refused.
fn parse_mem(v: &str) -> Result<u64, CliError> {
    let mut size = None;
    for (i, part) in v.split(',').enumerate() {
        match part.split_once('=') {
            Some(("size", s)) => size = Some(parse_size(s, "-m")?),
            None if i == 0 => size = Some(parse_size(part, "-m")?),
            Some(("slots" | "maxmem", _)) => {
                return Err(bad(
                    "-m",
                    v,
                    "slots and maxmem are for memory hotplug, which minivmm does not have",
                ))
            }
            _ => return Err(bad("-m", v, format!("unsupported property '{part}'"))),
        }
    }
    size.ok_or_else(|| bad("-m", v, "no size"))
}

/// A `-chardev` definition.
#[derive(Clone, Debug)]
struct Chardev {
    /// As given (for messages).
    spec: String,
    /// The backend as a `-qmp` spec (sockets, stdio), if it can be one.
    monitor: Option<String>,
    /// The backend as a serial console, if it can be one.
    serial: Option<SerialSpec>,
}

/// `-chardev BACKEND,id=ID[,...]`: (id, definition).
fn parse_chardev(v: &str) -> Result<(String, Chardev), CliError> {
    let mut parts = v.split(',');
    let backend = parts.next().unwrap_or("");
    let mut id = None;
    let mut path = None;
    let mut host = None;
    let mut port = None;
    let mut server = false;
    let mut wait = true;
    for p in parts {
        match p.split_once('=') {
            Some(("id", x)) => id = Some(x.to_string()),
            Some(("path", x)) => path = Some(x.to_string()),
            Some(("host", x)) => host = Some(x.to_string()),
            Some(("port", x)) => port = Some(x.to_string()),
            Some(("server", x)) => server = on_off("-chardev", v, x)?,
            Some(("wait", x)) => wait = on_off("-chardev", v, x)?,
            None if p == "server" => server = true,
            None if p == "nowait" => wait = false,
            _ => return Err(bad("-chardev", v, format!("unsupported property '{p}'"))),
        }
    }
    let id = id.ok_or_else(|| bad("-chardev", v, "no id"))?;
    let (monitor, serial) = match backend {
        "socket" => {
            if !server || wait {
                return Err(bad(
                    "-chardev",
                    v,
                    "only listening sockets that do not wait (server=on,wait=off)",
                ));
            }
            let spec = match (&path, &host, &port) {
                (Some(p), None, None) => format!("unix:{p},server=on,wait=off"),
                (None, h, Some(port)) => {
                    format!(
                        "tcp:{}:{port},server=on,wait=off",
                        h.as_deref().unwrap_or("")
                    )
                }
                _ => return Err(bad("-chardev", v, "a socket needs path= or port=")),
            };
            (Some(spec), None)
        }
        "stdio" => (Some("stdio".to_string()), Some(SerialSpec::Stdio)),
        "pty" => (None, Some(SerialSpec::Pty)),
        "null" => (None, Some(SerialSpec::None)),
        "file" => {
            let p = path.ok_or_else(|| bad("-chardev", v, "file needs path="))?;
            (None, Some(SerialSpec::File(p.into())))
        }
        _ => {
            return Err(bad(
                "-chardev",
                v,
                format!("backend '{backend}' is not supported (socket, pty, file, stdio, null)"),
            ))
        }
    };
    Ok((
        id,
        Chardev {
            spec: v.to_string(),
            monitor,
            serial,
        },
    ))
}

/// The value of `key=` in a comma-separated option (`None`: absent).
fn prop<'a>(v: &'a str, key: &str) -> Option<&'a str> {
    v.split(',')
        .find_map(|p| p.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
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
        "pty" => Ok(SerialSpec::Pty),
        _ => {
            if let Some(p) = v.strip_prefix("file:") {
                return Ok(SerialSpec::File(p.into()));
            }
            Err(bad("-serial", v, "use stdio, file:PATH, pty or none"))
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
    let mut hmp = Vec::new();
    let mut incoming = None;
    let mut start_paused = false;
    let mut name = None;
    let mut pidfile = None;
    let mut daemonize = false;
    let mut no_reboot = false;
    let mut dirty_ring_size = 0;
    let mut mem_prealloc = false;
    let mut uuid = None;
    let mut sandbox = crate::sandbox::SandboxSpec::default();
    let mut no_shutdown = false;
    let mut dump_guest_core = true;
    let mut msg_timestamp = false;
    let mut nodefaults = false;
    let mut serial_given = false;
    let mut chardevs: Vec<(String, Chardev)> = Vec::new();
    let mut mons: Vec<String> = Vec::new();
    let mut serial_devs: Vec<String> = Vec::new();
    let mut tls_creds = Vec::new();

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
            "-m" => mem_size = parse_mem(&value(opt)?)?,
            "-smp" => vcpus = parse_smp(&value(opt)?)?,
            "-cpu" => {
                let v = value(opt)?;
                if v == "help" || v == "?" {
                    return Ok(Action::CpuHelp);
                }
                cpu = CpuModel::parse(&v).map_err(|e| bad("-cpu", &v, e.to_string()))?;
            }
            "-machine" | "-M" => {
                let v = value(opt)?;
                if v == "help" || v == "?" {
                    return Ok(Action::MachineHelp);
                }
                parse_machine(&v, &mut hole_start, &mut dump_guest_core)?
            }
            "-serial" => {
                serial = parse_serial(&value(opt)?)?;
                serial_given = true;
            }
            "-chardev" => {
                let (id, c) = parse_chardev(&value(opt)?)?;
                if chardevs.iter().any(|(i, _)| *i == id) {
                    return Err(bad(
                        "-chardev",
                        &c.spec,
                        format!("duplicate chardev id '{id}'"),
                    ));
                }
                chardevs.push((id, c));
            }
            "-mon" => mons.push(value(opt)?),
            "-device" => {
                let v = value(opt)?;
                let driver = v.split(',').next().unwrap_or("");
                let driver = driver.strip_prefix("driver=").unwrap_or(driver);
                if driver != "isa-serial" {
                    return Err(bad(
                        "-device",
                        &v,
                        format!(
                            "minivmm has no device '{driver}' (only isa-serial, its one 8250 port)"
                        ),
                    ));
                }
                serial_devs.push(v);
            }
            "-object" => {
                let o = parse_object(&value(opt)?)?;
                if tls_creds.iter().any(|t: &TlsCredsSpec| t.id == o.id) {
                    return Err(bad("-object", &o.id, "duplicate id"));
                }
                tls_creds.push(o);
            }
            "-uuid" => {
                let v = value(opt)?;
                let hex: Vec<usize> = [8, 4, 4, 4, 12].to_vec();
                let ok = v.split('-').map(str::len).collect::<Vec<_>>() == hex
                    && v.chars().all(|c| c == '-' || c.is_ascii_hexdigit());
                if !ok {
                    return Err(bad("-uuid", &v, "not a UUID (8-4-4-4-12 hex digits)"));
                }
                uuid = Some(v.to_ascii_lowercase());
            }
            "-no-shutdown" => no_shutdown = true,
            "-nodefaults" => nodefaults = true,
            "-no-user-config" => {}
            "-rtc" => {
                let v = value(opt)?;
                for p in v.split(',') {
                    if p != "base=utc" {
                        return Err(bad(
                            "-rtc",
                            &v,
                            format!("'{p}' is not supported: the RTC runs on UTC (base=utc)"),
                        ));
                    }
                }
            }
            "-msg" => {
                let v = value(opt)?;
                match v.split_once('=') {
                    Some(("timestamp", x)) => msg_timestamp = on_off("-msg", &v, x)?,
                    _ => return Err(bad("-msg", &v, "only timestamp=on|off")),
                }
            }
            "-overcommit" => {
                let v = value(opt)?;
                for p in v.split(',') {
                    if !matches!(p, "mem-lock=off" | "cpu-pm=off") {
                        return Err(bad(
                            "-overcommit",
                            &v,
                            format!("'{p}' is not supported (mem-lock=off, cpu-pm=off)"),
                        ));
                    }
                }
            }
            "-sandbox" => {
                let v = value(opt)?;
                sandbox = crate::sandbox::SandboxSpec::parse(&v)
                    .map_err(|why| bad("-sandbox", &v, why))?;
            }
            "-boot" => {
                let v = value(opt)?;
                for p in v.split(',') {
                    if !matches!(p, "strict=on" | "strict=off") {
                        return Err(bad(
                            "-boot",
                            &v,
                            format!(
                                "'{p}': minivmm boots the -kernel directly (only strict=on|off)"
                            ),
                        ));
                    }
                }
            }
            "-qmp" => qmp.push(value(opt)?),
            "-monitor" => {
                let v = value(opt)?;
                if v != "none" {
                    qmp::ListenSpec::parse(&v).map_err(|e| bad("-monitor", &v, e.to_string()))?;
                    hmp.push(v);
                }
            }
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
                for (i, p) in v.split(',').enumerate() {
                    match p.split_once('=') {
                        None if i == 0 => name = Some(p.to_string()),
                        Some(("guest", n)) => name = Some(n.to_string()),
                        // minivmm's threads always have names (vcpuN, ...).
                        Some(("debug-threads", "on")) => {}
                        _ => return Err(bad("-name", &v, format!("unsupported property '{p}'"))),
                    }
                }
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
    let chardev = |opt: &str, v: &str| -> Result<Chardev, CliError> {
        let id = prop(v, "chardev").ok_or_else(|| bad(opt, v, "no chardev="))?;
        chardevs
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| bad(opt, v, format!("no -chardev with id '{id}'")))
    };
    for m in &mons {
        let to = match prop(m, "mode") {
            None | Some("control") => &mut qmp,
            Some("readline") => &mut hmp,
            Some(mode) => {
                return Err(bad(
                    "-mon",
                    m,
                    format!("mode={mode}: use control (QMP) or readline (HMP)"),
                ))
            }
        };
        let c = chardev("-mon", m)?;
        to.push(c.monitor.ok_or_else(|| {
            bad(
                "-mon",
                m,
                format!(
                    "chardev '{}' cannot carry a monitor (a socket or stdio can)",
                    c.spec
                ),
            )
        })?);
    }
    let mut serial_label = "serial0".to_string();
    match serial_devs.as_slice() {
        [] => {
            if nodefaults && !serial_given {
                serial = SerialSpec::None;
            }
        }
        [d] => {
            if serial_given {
                return Err(bad(
                    "-device",
                    d,
                    "minivmm has one serial port and -serial took it",
                ));
            }
            if prop(d, "index").is_some_and(|i| i != "0") {
                return Err(bad("-device", d, "minivmm has one serial port: index=0"));
            }
            let c = chardev("-device", d)?;
            serial = c.serial.ok_or_else(|| {
                bad(
                    "-device",
                    d,
                    format!("chardev '{}' cannot carry a serial console", c.spec),
                )
            })?;
            serial_label = prop(d, "chardev").unwrap_or("serial0").to_string();
        }
        [_, d, ..] => return Err(bad("-device", d, "minivmm has one serial port")),
    }
    // stdio carries one thing: a monitor there takes it from the default
    // serial console (QEMU's default console is not stdio either).
    let stdio_monitors = qmp.iter().chain(&hmp).filter(|m| *m == "stdio").count();
    if stdio_monitors > 1 {
        return Err(bad("-monitor", "stdio", "stdio can carry one monitor"));
    }
    if stdio_monitors == 1 && serial == SerialSpec::Stdio {
        if serial_given || !serial_devs.is_empty() {
            return Err(bad(
                "-serial",
                "stdio",
                "stdio carries a monitor: put the serial console elsewhere (file:PATH, pty, none)",
            ));
        }
        serial = SerialSpec::None;
    }
    if daemonize && serial == SerialSpec::Stdio {
        return Err(bad("-daemonize", "", "cannot be used with -serial stdio"));
    }
    if daemonize && stdio_monitors > 0 {
        return Err(bad(
            "-daemonize",
            "",
            "cannot be used with a monitor on stdio",
        ));
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
        hmp,
        incoming,
        start_paused,
        name,
        pidfile,
        daemonize,
        no_reboot,
        mem_prealloc,
        dirty_ring_size,
        uuid,
        no_shutdown,
        dump_guest_core,
        msg_timestamp,
        serial_label,
        sandbox,
        tls_creds,
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
        assert!(p("-kernel k -device virtio-net")
            .unwrap_err()
            .to_string()
            .contains("minivmm has no device 'virtio-net'"));
        assert!(p("-kernel k -object authz-simple,id=a,identity=x")
            .unwrap_err()
            .to_string()
            .contains("'authz-simple' is not supported"));
        assert!(matches!(p("-kernel"), Err(CliError::MissingValue(_))));
        assert!(matches!(p("-m 12"), Err(CliError::Missing(_))));
        assert!(p("-kernel k -m 1X").is_err());
        assert!(p("-kernel k -machine foo").is_err());
        assert!(p("-kernel k -machine pc,smm=on").is_err());
        assert!(p("-kernel k -display gtk").is_err());
        assert!(p("-kernel k -serial tcp:1:2").is_err());
        assert!(p("-kernel k -daemonize").is_err());
    }

    /// libvirt's command line for a direct-kernel-boot domain, and what is
    /// refused in it rather than half-read.
    #[test]
    fn libvirt_command_lines() {
        let c = cfg("-name guest=demo,debug-threads=on -S -machine pc-i440fx-7.2,usb=off,dump-guest-core=off \
             -accel kvm -m size=131072k -overcommit mem-lock=off -smp 2,sockets=1,dies=1,cores=2,threads=1 \
             -uuid 5E7A1B2C-0D3E-4F5A-8B6C-7D8E9FA0B1C2 -no-user-config -nodefaults \
             -chardev socket,id=charmonitor,path=/tmp/m.qmp,server=on,wait=off \
             -mon chardev=charmonitor,id=monitor,mode=control -rtc base=utc -no-shutdown -boot strict=on \
             -kernel k -chardev pty,id=charserial0 -device isa-serial,chardev=charserial0,id=serial0,index=0 \
             -msg timestamp=on -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
        assert_eq!(c.name.as_deref(), Some("demo"));
        assert_eq!((c.mem_size, c.vcpus), (128 << 20, 2));
        assert_eq!(
            c.qmp,
            vec!["unix:/tmp/m.qmp,server=on,wait=off".to_string()]
        );
        assert_eq!(
            (c.serial.clone(), c.serial_label.as_str()),
            (SerialSpec::Pty, "charserial0")
        );
        assert_eq!(
            c.uuid.as_deref(),
            Some("5e7a1b2c-0d3e-4f5a-8b6c-7d8e9fa0b1c2")
        );
        assert!(c.no_shutdown && c.msg_timestamp && !c.dump_guest_core && c.start_paused);
        assert!(c.sandbox.on && c.sandbox.deny_spawn && c.sandbox.deny_resource_control);
        // -nodefaults alone: no serial console.
        assert_eq!(cfg("-kernel k -nodefaults").serial, SerialSpec::None);
        assert_eq!(
            cfg("-kernel k").sandbox,
            crate::sandbox::SandboxSpec::default()
        );
        // TLS credentials objects.
        let c = cfg(
            "-kernel k -object tls-creds-x509,id=t0,dir=/c,endpoint=server,verify-peer=off \
                     -object tls-creds-x509,id=t1,dir=/d",
        );
        assert_eq!(
            c.tls_creds,
            vec![
                TlsCredsSpec {
                    id: "t0".into(),
                    dir: "/c".into(),
                    endpoint: migration::tls::Endpoint::Server,
                    verify_peer: false
                },
                TlsCredsSpec {
                    id: "t1".into(),
                    dir: "/d".into(),
                    endpoint: migration::tls::Endpoint::Client,
                    verify_peer: true
                }
            ]
        );
        // Monitors: QMP and HMP on sockets and stdio; a monitor on stdio
        // takes it from the default serial console.
        let c = cfg("-kernel k -qmp stdio -monitor unix:/tmp/h,server=on,wait=off -monitor none");
        assert_eq!(c.qmp, vec!["stdio".to_string()]);
        assert_eq!(c.hmp, vec!["unix:/tmp/h,server=on,wait=off".to_string()]);
        assert_eq!(c.serial, SerialSpec::None);
        let c = cfg(
            "-kernel k -serial pty -chardev stdio,id=m -mon chardev=m,mode=readline \
                     -chardev socket,id=q,path=/q,server=on,wait=off -mon chardev=q",
        );
        assert_eq!(c.hmp, vec!["stdio".to_string()]);
        assert_eq!(c.qmp, vec!["unix:/q,server=on,wait=off".to_string()]);
        assert_eq!(c.serial, SerialSpec::Pty);
        for (bad, why) in [
            ("-smp 2,sockets=2,cores=1,threads=1", "cores of one socket"),
            ("-smp 4,maxcpus=8", "no CPU hotplug"),
            ("-m size=1G,slots=4,maxmem=8G", "memory hotplug"),
            ("-machine pc,usb=on", "no USB"),
            (
                "-chardev socket,id=c,path=/x,server=on,wait=off -mon chardev=c,mode=vt100",
                "control (QMP) or readline (HMP)",
            ),
            (
                "-chardev file,id=c,path=/x -mon chardev=c",
                "a socket or stdio can",
            ),
            ("-qmp stdio -monitor stdio", "one monitor"),
            (
                "-serial stdio -qmp stdio",
                "put the serial console elsewhere",
            ),
            (
                "-chardev stdio,id=s -device isa-serial,chardev=s -monitor stdio",
                "put the serial console elsewhere",
            ),
            ("-daemonize -serial none -qmp stdio", "monitor on stdio"),
            ("-monitor vc", "unsupported monitor backend"),
            ("-object tls-creds-x509,id=t,endpoint=server", "no dir"),
            ("-object tls-creds-x509,dir=/c", "no id"),
            (
                "-object tls-creds-x509,id=t,dir=/c,endpoint=both",
                "client or server",
            ),
            (
                "-object tls-creds-psk,id=t,dir=/c",
                "'tls-creds-psk' is not supported",
            ),
            (
                "-object tls-creds-x509,id=t,dir=/c -object tls-creds-x509,id=t,dir=/d",
                "duplicate id",
            ),
            (
                "-chardev socket,id=c,path=/x,server=on,wait=on",
                "server=on,wait=off",
            ),
            (
                "-device isa-serial,chardev=nope",
                "no -chardev with id 'nope'",
            ),
            ("-rtc base=localtime", "base=utc"),
            ("-sandbox on,elevateprivileges=children", "allow or deny"),
            ("-uuid 1234", "not a UUID"),
            (
                "-serial stdio -chardev stdio,id=s -device isa-serial,chardev=s",
                "one serial port",
            ),
        ] {
            let e = p(&format!("-kernel k {bad}")).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
