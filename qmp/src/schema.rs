//! The QMP commands minivmm understands, as typed Rust values.
//!
//! This module owns the command names (QEMU's spellings plus a few aliases),
//! their argument types, and every check that can be made on a request
//! without looking at the VM: unknown, missing and mistyped arguments, enum
//! values, ranges, mutually exclusive arguments. [`Command::parse`] turns a
//! `(name, arguments)` pair from [`crate::protocol::parse_request`] into a
//! [`Command`], or into the [`QmpError`] QEMU would send, before anything
//! has happened to the VM. Checks that need the VM's state (is a migration
//! running? is `max-cpu-throttle` ≥ the current `cpu-throttle-initial`?)
//! belong to the handler.
//!
//! Argument structs derive serde's `Deserialize` with `deny_unknown_fields`
//! and are deserialized through a private deserializer that words errors the
//! way QEMU's QAPI visitor does (`Parameter 'foo' is unexpected`, ...).

mod args;
mod introspect;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::protocol::QmpError;
use args::from_arguments;

/// Every command name [`Command::parse`] accepts, aliases included; this is
/// what `query-commands` lists.
pub const COMMAND_NAMES: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-status",
    "query-name",
    "stop",
    "cont",
    "quit",
    "system_reset",
    "system_powerdown",
    "query-cpus-fast",
    "pmemsave",
    "memsave",
    "human-monitor-command",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "migrate-cancel",
    "migrate-continue",
    "migrate-pause",
    "migrate-recover",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "query-migrate",
    "migrate-start-postcopy",
    "migrate_start_postcopy",
    "x-colo-lost-heartbeat",
    "query-colo-status",
    "calc-dirty-rate",
    "query-dirty-rate",
    "set-vcpu-dirty-limit",
    "cancel-vcpu-dirty-limit",
    "query-vcpu-dirty-limit",
    "query-qmp-schema",
    "query-machines",
    "query-cpu-definitions",
    "query-kvm",
    "query-target",
    "query-hotpluggable-cpus",
    "query-uuid",
    "query-memory-size-summary",
    "query-chardev",
    "object-add",
    "object-del",
];

/// The `query-qmp-schema` reply: every command of [`COMMAND_NAMES`] with
/// the argument type [`Command::parse`] deserializes for it.
pub fn qmp_schema_reply() -> Value {
    let mut s = introspect::Schema::default();
    for &name in COMMAND_NAMES {
        match name {
            "qmp_capabilities" => s.command::<QmpCapabilitiesArgs>(name),
            "pmemsave" => s.command::<PmemsaveArgs>(name),
            "memsave" => s.command::<MemsaveArgs>(name),
            "human-monitor-command" => s.command::<HumanMonitorCommandArgs>(name),
            "migrate" => s.command::<RawMigrateArgs>(name),
            "migrate-incoming" => s.command::<RawMigrateIncomingArgs>(name),
            "migrate-continue" => s.command::<MigrateContinueArgs>(name),
            "migrate-recover" => s.command::<MigrateRecoverArgs>(name),
            "migrate-set-capabilities" => s.command::<MigrateSetCapabilitiesArgs>(name),
            "migrate-set-parameters" => s.command::<MigrateSetParameters>(name),
            "calc-dirty-rate" => s.command::<CalcDirtyRateArgs>(name),
            "query-dirty-rate" => s.command::<QueryDirtyRateArgs>(name),
            "set-vcpu-dirty-limit" => s.command::<SetVcpuDirtyLimitArgs>(name),
            "cancel-vcpu-dirty-limit" => s.command::<CancelVcpuDirtyLimitArgs>(name),
            "object-add" => s.command::<ObjectAddArgs>(name),
            "object-del" => s.command::<ObjectDelArgs>(name),
            _ => s.command::<NoArgs>(name),
        }
    }
    s.finish()
}

/// The `query-commands` return value: `[{"name": ...}, ...]` for every name
/// in [`COMMAND_NAMES`].
pub fn query_commands_reply() -> Value {
    Value::Array(COMMAND_NAMES.iter().map(|n| json!({ "name": n })).collect())
}

/// A parsed, argument-checked command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `qmp_capabilities`: leave negotiation mode.
    QmpCapabilities(QmpCapabilitiesArgs),
    /// `query-version`.
    QueryVersion,
    /// `query-commands`.
    QueryCommands,
    /// `query-status`: `{running, status}`.
    QueryStatus,
    /// `query-name`: `{name?}`.
    QueryName,
    /// `stop`: pause the vCPUs.
    Stop,
    /// `cont`: resume the vCPUs.
    Cont,
    /// `quit`: exit the VMM (after the reply is flushed).
    Quit,
    /// `system_reset`.
    SystemReset,
    /// `system_powerdown`: ask the guest to power off.
    SystemPowerdown,
    /// `query-cpus-fast`.
    QueryCpusFast,
    /// `pmemsave`: dump guest-physical memory to a file.
    Pmemsave(PmemsaveArgs),
    /// `memsave`: dump guest-virtual memory (as seen by a vCPU) to a file.
    Memsave(MemsaveArgs),
    /// `human-monitor-command`: run an HMP command line (`info status`, ...).
    HumanMonitorCommand(HumanMonitorCommandArgs),
    /// `migrate`: start an outgoing migration.
    Migrate(MigrateArgs),
    /// `migrate-incoming`: start listening for an incoming migration
    /// (`-incoming defer`).
    MigrateIncoming(MigrateIncomingArgs),
    /// `migrate_cancel` (alias `migrate-cancel`).
    MigrateCancel,
    /// `migrate-continue`: leave `pre-switchover`.
    MigrateContinue(MigrateContinueArgs),
    /// `migrate-pause`: break a postcopy's connection on purpose (either
    /// side): both sides go to `postcopy-paused`.
    MigratePause,
    /// `calc-dirty-rate`: measure the guest's dirty rate.
    CalcDirtyRate(CalcDirtyRateArgs),
    /// `query-dirty-rate`: the last measurement.
    QueryDirtyRate(QueryDirtyRateArgs),
    /// `set-vcpu-dirty-limit {cpu-index?, dirty-rate}`.
    SetVcpuDirtyLimit(SetVcpuDirtyLimitArgs),
    /// `cancel-vcpu-dirty-limit {cpu-index?}`.
    CancelVcpuDirtyLimit(CancelVcpuDirtyLimitArgs),
    /// `query-vcpu-dirty-limit`.
    QueryVcpuDirtyLimit,
    /// `query-qmp-schema`: this schema ([`qmp_schema_reply`]).
    QueryQmpSchema,
    /// `query-machines`.
    QueryMachines,
    /// `query-cpu-definitions`.
    QueryCpuDefinitions,
    /// `query-kvm`.
    QueryKvm,
    /// `query-target`.
    QueryTarget,
    /// `query-hotpluggable-cpus`.
    QueryHotpluggableCpus,
    /// `query-uuid`.
    QueryUuid,
    /// `object-add`: TLS credentials.
    ObjectAdd(ObjectAddArgs),
    /// `object-del`.
    ObjectDel(ObjectDelArgs),
    /// `query-memory-size-summary`.
    QueryMemorySizeSummary,
    /// `query-chardev`.
    QueryChardev,
    /// `migrate-recover {uri}` on a paused postcopy destination: listen on
    /// `uri` for the source's `migrate {uri, resume: true}`.
    MigrateRecover(MigrateRecoverArgs),
    /// `migrate-set-capabilities`.
    MigrateSetCapabilities(MigrateSetCapabilitiesArgs),
    /// `query-migrate-capabilities`.
    QueryMigrateCapabilities,
    /// `migrate-set-parameters`.
    MigrateSetParameters(Box<MigrateSetParameters>),
    /// `query-migrate-parameters`.
    QueryMigrateParameters,
    /// `query-migrate`.
    QueryMigrate,
    /// `migrate-start-postcopy` (alias `migrate_start_postcopy`).
    MigrateStartPostcopy,
    /// `x-colo-lost-heartbeat`.
    XColoLostHeartbeat,
    /// `query-colo-status`.
    QueryColoStatus,
}

/// Arguments that must be absent (commands without arguments).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

impl Command {
    /// Checks `arguments` against the schema of command `name`.
    ///
    /// Unknown names give `CommandNotFound` "The command foo has not been
    /// found"; argument problems give a `GenericError` naming the parameter.
    pub fn parse(name: &str, arguments: Map<String, Value>) -> Result<Command, QmpError> {
        let none = |arguments: Map<String, Value>, cmd: Command| {
            from_arguments::<NoArgs>(arguments).map(|_| cmd)
        };
        match name {
            "qmp_capabilities" => from_arguments(arguments).map(Command::QmpCapabilities),
            "query-version" => none(arguments, Command::QueryVersion),
            "query-commands" => none(arguments, Command::QueryCommands),
            "query-status" => none(arguments, Command::QueryStatus),
            "query-name" => none(arguments, Command::QueryName),
            "stop" => none(arguments, Command::Stop),
            "cont" => none(arguments, Command::Cont),
            "quit" => none(arguments, Command::Quit),
            "system_reset" => none(arguments, Command::SystemReset),
            "system_powerdown" => none(arguments, Command::SystemPowerdown),
            "query-cpus-fast" => none(arguments, Command::QueryCpusFast),
            "pmemsave" => {
                let a: PmemsaveArgs = from_arguments(arguments)?;
                check_range(a.val, a.size)?;
                Ok(Command::Pmemsave(a))
            }
            "memsave" => {
                let a: MemsaveArgs = from_arguments(arguments)?;
                check_range(a.val, a.size)?;
                Ok(Command::Memsave(a))
            }
            "human-monitor-command" => from_arguments(arguments).map(Command::HumanMonitorCommand),
            "object-add" => {
                let a: ObjectAddArgs = from_arguments(arguments)?;
                if a.qom_type != "tls-creds-x509" {
                    return Err(QmpError::generic(format!(
                        "Parameter 'qom-type' does not accept value '{}' (minivmm has \
                         tls-creds-x509 objects only)",
                        a.qom_type
                    )));
                }
                if !matches!(a.endpoint.as_deref(), None | Some("client" | "server")) {
                    return Err(QmpError::generic(
                        "Parameter 'endpoint' does not accept value (client or server)",
                    ));
                }
                Ok(Command::ObjectAdd(a))
            }
            "object-del" => from_arguments(arguments).map(Command::ObjectDel),
            "migrate" => {
                let raw: RawMigrateArgs = from_arguments(arguments)?;
                Ok(Command::Migrate(MigrateArgs {
                    uri: uri_or_channels(raw.uri, raw.channels)?,
                    resume: raw.resume.unwrap_or(false),
                }))
            }
            "migrate-incoming" => {
                let raw: RawMigrateIncomingArgs = from_arguments(arguments)?;
                Ok(Command::MigrateIncoming(MigrateIncomingArgs {
                    uri: uri_or_channels(raw.uri, raw.channels)?,
                    exit_on_error: raw.exit_on_error.unwrap_or(true),
                }))
            }
            "migrate_cancel" | "migrate-cancel" => none(arguments, Command::MigrateCancel),
            "migrate-continue" => from_arguments(arguments).map(Command::MigrateContinue),
            "migrate-pause" => none(arguments, Command::MigratePause),
            "migrate-recover" => from_arguments(arguments).map(Command::MigrateRecover),
            "migrate-set-capabilities" => {
                from_arguments(arguments).map(Command::MigrateSetCapabilities)
            }
            "query-migrate-capabilities" => none(arguments, Command::QueryMigrateCapabilities),
            "migrate-set-parameters" => {
                let p: MigrateSetParameters = from_arguments(arguments)?;
                p.check()?;
                Ok(Command::MigrateSetParameters(Box::new(p)))
            }
            "query-migrate-parameters" => none(arguments, Command::QueryMigrateParameters),
            "query-migrate" => none(arguments, Command::QueryMigrate),
            "migrate-start-postcopy" | "migrate_start_postcopy" => {
                none(arguments, Command::MigrateStartPostcopy)
            }
            "x-colo-lost-heartbeat" => none(arguments, Command::XColoLostHeartbeat),
            "query-colo-status" => none(arguments, Command::QueryColoStatus),
            "calc-dirty-rate" => {
                let a: CalcDirtyRateArgs = from_arguments(arguments)?;
                a.check()?;
                Ok(Command::CalcDirtyRate(a))
            }
            "query-dirty-rate" => from_arguments(arguments).map(Command::QueryDirtyRate),
            "set-vcpu-dirty-limit" => from_arguments(arguments).map(Command::SetVcpuDirtyLimit),
            "cancel-vcpu-dirty-limit" => {
                from_arguments(arguments).map(Command::CancelVcpuDirtyLimit)
            }
            "query-vcpu-dirty-limit" => none(arguments, Command::QueryVcpuDirtyLimit),
            "query-qmp-schema" => none(arguments, Command::QueryQmpSchema),
            "query-machines" => none(arguments, Command::QueryMachines),
            "query-cpu-definitions" => none(arguments, Command::QueryCpuDefinitions),
            "query-kvm" => none(arguments, Command::QueryKvm),
            "query-target" => none(arguments, Command::QueryTarget),
            "query-hotpluggable-cpus" => none(arguments, Command::QueryHotpluggableCpus),
            "query-uuid" => none(arguments, Command::QueryUuid),
            "query-memory-size-summary" => none(arguments, Command::QueryMemorySizeSummary),
            "query-chardev" => none(arguments, Command::QueryChardev),
            _ => Err(QmpError::command_not_found(format!(
                "The command {name} has not been found"
            ))),
        }
    }

    /// The canonical (QEMU) name of the command; aliases map to it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::QmpCapabilities(_) => "qmp_capabilities",
            Command::QueryVersion => "query-version",
            Command::QueryCommands => "query-commands",
            Command::QueryStatus => "query-status",
            Command::QueryName => "query-name",
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::Quit => "quit",
            Command::SystemReset => "system_reset",
            Command::SystemPowerdown => "system_powerdown",
            Command::QueryCpusFast => "query-cpus-fast",
            Command::Pmemsave(_) => "pmemsave",
            Command::Memsave(_) => "memsave",
            Command::HumanMonitorCommand(_) => "human-monitor-command",
            Command::Migrate(_) => "migrate",
            Command::MigrateIncoming(_) => "migrate-incoming",
            Command::MigrateCancel => "migrate_cancel",
            Command::MigrateContinue(_) => "migrate-continue",
            Command::MigratePause => "migrate-pause",
            Command::MigrateRecover(_) => "migrate-recover",
            Command::MigrateSetCapabilities(_) => "migrate-set-capabilities",
            Command::QueryMigrateCapabilities => "query-migrate-capabilities",
            Command::MigrateSetParameters(_) => "migrate-set-parameters",
            Command::QueryMigrateParameters => "query-migrate-parameters",
            Command::QueryMigrate => "query-migrate",
            Command::MigrateStartPostcopy => "migrate-start-postcopy",
            Command::XColoLostHeartbeat => "x-colo-lost-heartbeat",
            Command::QueryColoStatus => "query-colo-status",
            Command::CalcDirtyRate(_) => "calc-dirty-rate",
            Command::QueryDirtyRate(_) => "query-dirty-rate",
            Command::SetVcpuDirtyLimit(_) => "set-vcpu-dirty-limit",
            Command::CancelVcpuDirtyLimit(_) => "cancel-vcpu-dirty-limit",
            Command::QueryVcpuDirtyLimit => "query-vcpu-dirty-limit",
            Command::QueryQmpSchema => "query-qmp-schema",
            Command::QueryMachines => "query-machines",
            Command::QueryCpuDefinitions => "query-cpu-definitions",
            Command::QueryKvm => "query-kvm",
            Command::QueryTarget => "query-target",
            Command::QueryHotpluggableCpus => "query-hotpluggable-cpus",
            Command::QueryUuid => "query-uuid",
            Command::QueryMemorySizeSummary => "query-memory-size-summary",
            Command::QueryChardev => "query-chardev",
            Command::ObjectAdd(_) => "object-add",
            Command::ObjectDel(_) => "object-del",
        }
    }
}

/// QMP capabilities a client may ask for in `qmp_capabilities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QmpCapability {
    /// Out-of-band execution; never offered by minivmm.
    Oob,
}

/// `qmp_capabilities {enable?: [QMPCapability]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QmpCapabilitiesArgs {
    /// Capabilities to enable. Minivmm offers none, so any entry is an
    /// error ("Capability 'oob' not available").
    pub enable: Option<Vec<QmpCapability>>,
}

/// `object-add {qom-type, id, ...}`: minivmm's objects are TLS
/// credentials, `tls-creds-x509` with QEMU's properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ObjectAddArgs {
    /// The object's type: `tls-creds-x509`.
    pub qom_type: String,
    /// Its id.
    pub id: String,
    /// The credentials' directory.
    pub dir: Option<String>,
    /// `client` (the default) or `server`.
    pub endpoint: Option<String>,
    /// Verify the peer (default on).
    pub verify_peer: Option<bool>,
}

/// `object-del {id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectDelArgs {
    /// The object's id.
    pub id: String,
}

/// `pmemsave {val, size, filename}`: guest-physical range `[val, val+size)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemsaveArgs {
    /// Guest-physical start address.
    pub val: u64,
    /// Number of bytes.
    pub size: u64,
    /// Output file, created or truncated.
    pub filename: String,
}

/// `memsave {val, size, filename, cpu-index?}`: guest-virtual range as seen
/// by a vCPU (default vCPU 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MemsaveArgs {
    /// Guest-virtual start address.
    pub val: u64,
    /// Number of bytes.
    pub size: u64,
    /// Output file, created or truncated.
    pub filename: String,
    /// The vCPU whose page tables translate `val`.
    pub cpu_index: Option<u64>,
}

fn check_range(val: u64, size: u64) -> Result<(), QmpError> {
    match val.checked_add(size) {
        Some(_) => Ok(()),
        None => Err(QmpError::generic(
            "Parameters 'val' and 'size' describe a range beyond the 64-bit address space",
        )),
    }
}

/// `human-monitor-command {command-line, cpu-index?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HumanMonitorCommandArgs {
    /// The HMP command line, e.g. `"info status"`.
    pub command_line: String,
    /// The vCPU the command applies to, if it cares.
    pub cpu_index: Option<u64>,
}

/// `migrate` after argument checks.
///
/// On the wire: `{uri?: str, channels?: [MigrationChannel], detach?: bool,
/// resume?: bool}` with exactly one of `uri` and `channels`. A `channels`
/// list is accepted when it holds exactly one `main` channel whose address
/// has a URI equivalent (socket `inet` → `tcp:HOST:PORT`, socket `unix` →
/// `unix:PATH`, `exec` → `exec:CMD`, `file` → `file:PATH[,offset=N]`), and is
/// reduced to that URI; other channel forms are refused. `detach` is
/// accepted and ignored, as in QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateArgs {
    /// Destination URI: `tcp:HOST:PORT`, `unix:PATH`, `exec:CMD`, `file:PATH`.
    pub uri: String,
    /// Resume a paused postcopy migration.
    pub resume: bool,
}

/// `migrate-incoming` after argument checks; `channels` is reduced to a URI
/// as for [`MigrateArgs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateIncomingArgs {
    /// URI to listen on or read from.
    pub uri: String,
    /// Exit the VMM when the incoming migration fails (QEMU's default: true).
    pub exit_on_error: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMigrateArgs {
    uri: Option<String>,
    channels: Option<Vec<MigrationChannel>>,
    #[allow(dead_code)]
    detach: Option<bool>,
    resume: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMigrateIncomingArgs {
    uri: Option<String>,
    channels: Option<Vec<MigrationChannel>>,
    exit_on_error: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum MigrationChannelType {
    Main,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MigrationChannel {
    #[allow(dead_code)]
    channel_type: MigrationChannelType,
    addr: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum MigrationTransport {
    Socket,
    Exec,
    Rdma,
    File,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SocketAddressType {
    Inet,
    Unix,
    Vsock,
    Fd,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransportOnly {
    transport: MigrationTransport,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SocketTypeOnly {
    #[serde(rename = "type")]
    kind: SocketAddressType,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InetAddr {
    host: String,
    port: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnixAddr {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecAddr {
    args: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAddr {
    filename: String,
    offset: Option<u64>,
}

/// Removes `key` from `map` into a one-member map (for a discriminator).
fn split_off(map: &mut Map<String, Value>, key: &str) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(v) = map.remove(key) {
        m.insert(key.into(), v);
    }
    m
}

fn uri_or_channels(
    uri: Option<String>,
    channels: Option<Vec<MigrationChannel>>,
) -> Result<String, QmpError> {
    match (uri, channels) {
        (Some(_), Some(_)) => Err(QmpError::generic(
            "'uri' and 'channels' arguments are mutually exclusive; exactly one of the two should be present",
        )),
        // QEMU 7.2's words (its `uri` was mandatory).
        (None, None) => Err(QmpError::generic("Parameter 'uri' is missing")),
        (Some(uri), None) => Ok(uri),
        (None, Some(channels)) => channels_uri(channels),
    }
}

/// Reduces a one-entry `channels` list to the equivalent URI.
fn channels_uri(mut channels: Vec<MigrationChannel>) -> Result<String, QmpError> {
    if channels.len() > 1 {
        return Err(QmpError::generic("Channel list has more than one entries"));
    }
    let Some(channel) = channels.pop() else {
        return Err(QmpError::generic("Channel list is empty"));
    };
    let mut addr = channel.addr;
    let transport: TransportOnly = from_arguments(split_off(&mut addr, "transport"))?;
    match transport.transport {
        MigrationTransport::Socket => {
            let kind: SocketTypeOnly = from_arguments(split_off(&mut addr, "type"))?;
            match kind.kind {
                SocketAddressType::Inet => {
                    let a: InetAddr = from_arguments(addr)?;
                    if a.host.contains(':') {
                        Ok(format!("tcp:[{}]:{}", a.host, a.port))
                    } else {
                        Ok(format!("tcp:{}:{}", a.host, a.port))
                    }
                }
                SocketAddressType::Unix => {
                    let a: UnixAddr = from_arguments(addr)?;
                    Ok(format!("unix:{}", a.path))
                }
                SocketAddressType::Vsock | SocketAddressType::Fd => Err(QmpError::generic(
                    "Only 'inet' and 'unix' socket addresses are supported for migration",
                )),
            }
        }
        MigrationTransport::Exec => {
            let a: ExecAddr = from_arguments(addr)?;
            match a.args.as_slice() {
                [] => Err(QmpError::generic("Parameter 'args' must not be empty")),
                [sh, c, cmd] if sh.ends_with("sh") && c == "-c" => Ok(format!("exec:{cmd}")),
                args => Ok(format!(
                    "exec:{}",
                    args.iter()
                        .map(|a| shell_quote(a))
                        .collect::<Vec<_>>()
                        .join(" ")
                )),
            }
        }
        MigrationTransport::File => {
            let a: FileAddr = from_arguments(addr)?;
            Ok(match a.offset {
                Some(off) => format!("file:{},offset={off}", a.filename),
                None => format!("file:{}", a.filename),
            })
        }
        MigrationTransport::Rdma => Err(QmpError::generic("RDMA migration is not supported")),
    }
}

/// Quotes `arg` for `/bin/sh` unless it is plainly safe.
fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+".contains(&b));
    if safe {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Migration capabilities minivmm knows (`MigrationCapability`); others are
/// refused with "Parameter 'capability' does not accept value 'foo'".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    /// Allow switching to postcopy (`migrate-start-postcopy`); set on both ends.
    #[serde(alias = "x-postcopy-ram")]
    PostcopyRam,
    /// COLO: the migration never ends, it keeps sending checkpoints.
    #[serde(rename = "x-colo")]
    XColo,
    /// Emit `MIGRATION` events on every status change.
    Events,
    /// Open a return path for precopy too.
    ReturnPath,
    /// Stop in `pre-switchover` until `migrate-continue`.
    PauseBeforeSwitchover,
    /// Throttle vCPUs when the migration does not converge.
    AutoConverge,
    /// Measure vCPU time blocked on postcopy faults.
    PostcopyBlocktime,
    /// Postcopy: requested pages on a second connection.
    PostcopyPreempt,
    /// Limit the vCPUs' dirty rate (`vcpu-dirty-limit`) when the migration
    /// does not converge.
    DirtyLimit,
}

impl MigrationCapability {
    /// Every capability, in `query-migrate-capabilities` order.
    pub const ALL: [MigrationCapability; 9] = [
        MigrationCapability::PostcopyRam,
        MigrationCapability::XColo,
        MigrationCapability::Events,
        MigrationCapability::ReturnPath,
        MigrationCapability::PauseBeforeSwitchover,
        MigrationCapability::AutoConverge,
        MigrationCapability::PostcopyBlocktime,
        MigrationCapability::PostcopyPreempt,
        MigrationCapability::DirtyLimit,
    ];

    /// The canonical QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationCapability::PostcopyRam => "postcopy-ram",
            MigrationCapability::XColo => "x-colo",
            MigrationCapability::Events => "events",
            MigrationCapability::ReturnPath => "return-path",
            MigrationCapability::PauseBeforeSwitchover => "pause-before-switchover",
            MigrationCapability::AutoConverge => "auto-converge",
            MigrationCapability::DirtyLimit => "dirty-limit",
            MigrationCapability::PostcopyBlocktime => "postcopy-blocktime",
            MigrationCapability::PostcopyPreempt => "postcopy-preempt",
        }
    }
}

/// One entry of `migrate-set-capabilities` / `query-migrate-capabilities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// Enabled or not.
    pub state: bool,
}

/// `migrate-set-capabilities {capabilities: [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateSetCapabilitiesArgs {
    /// The capabilities to change; others keep their state.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

/// `MigrationStatus`, QEMU 9.1's 15 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has started.
    None,
    /// Setting up.
    Setup,
    /// `migrate_cancel` in progress.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Precopy rounds running.
    Active,
    /// Postcopy running.
    PostcopyActive,
    /// Postcopy interrupted, waiting for recovery.
    PostcopyPaused,
    /// Postcopy recovery: setting up.
    PostcopyRecoverSetup,
    /// Postcopy recovery running.
    PostcopyRecover,
    /// Done.
    Completed,
    /// Failed.
    Failed,
    /// COLO checkpointing.
    Colo,
    /// Paused before switchover (`pause-before-switchover`).
    PreSwitchover,
    /// Migrating device state after `migrate-continue`.
    Device,
    /// Waiting for unplug.
    WaitUnplug,
}

impl MigrationStatus {
    /// The QMP name, e.g. `"postcopy-active"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecoverSetup => "postcopy-recover-setup",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
        }
    }

    /// Has the migration ended (or never started)?
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::None
                | MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled
        )
    }
}

/// The unit of `calc-time` (`calc-dirty-rate`, `query-dirty-rate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeUnit {
    /// Seconds (the default).
    #[default]
    Second,
    /// Milliseconds.
    Millisecond,
}

impl TimeUnit {
    /// QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Millisecond => "millisecond",
        }
    }
}

/// How `calc-dirty-rate` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyRateMode {
    /// QEMU's sampling of page hashes: refused here (see
    /// [`CalcDirtyRateArgs::check`]).
    PageSampling,
    /// KVM's dirty rings, per vCPU.
    DirtyRing,
    /// KVM's dirty bitmap.
    DirtyBitmap,
}

impl DirtyRateMode {
    /// QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PageSampling => "page-sampling",
            Self::DirtyRing => "dirty-ring",
            Self::DirtyBitmap => "dirty-bitmap",
        }
    }
}

/// `calc-dirty-rate {calc-time, calc-time-unit?, sample-pages?, mode?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CalcDirtyRateArgs {
    /// How long to measure, in `calc-time-unit`.
    pub calc_time: i64,
    /// Seconds (default) or milliseconds.
    #[serde(default)]
    pub calc_time_unit: Option<TimeUnit>,
    /// Pages sampled per GiB: page-sampling only (refused).
    #[serde(default)]
    pub sample_pages: Option<i64>,
    /// How (`None`: dirty-ring if the VM has rings, else dirty-bitmap).
    #[serde(default)]
    pub mode: Option<DirtyRateMode>,
}

impl CalcDirtyRateArgs {
    /// The measurement time, ms.
    pub fn calc_time_ms(&self) -> i64 {
        match self.calc_time_unit.unwrap_or_default() {
            TimeUnit::Second => self.calc_time.saturating_mul(1000),
            TimeUnit::Millisecond => self.calc_time,
        }
    }

    /// QEMU's range for `calc-time` (1-60 s, 50-60000 ms), and
    /// page-sampling refused: minivmm measures with KVM's dirty log.
    pub fn check(&self) -> Result<(), QmpError> {
        let ms = self.calc_time_ms();
        let ok = match self.calc_time_unit.unwrap_or_default() {
            TimeUnit::Second => (1_000..=60_000).contains(&ms),
            TimeUnit::Millisecond => (50..=60_000).contains(&ms),
        };
        if !ok {
            return Err(QmpError::generic(
                "Calc-time is out of range[1, 60] seconds or [50, 60000] milliseconds",
            ));
        }
        if self.mode == Some(DirtyRateMode::PageSampling) || self.sample_pages.is_some() {
            return Err(QmpError::generic(
                "mode 'page-sampling' (and sample-pages) is not supported: minivmm measures \
                 with KVM's dirty log (mode 'dirty-bitmap', or 'dirty-ring' with \
                 -accel kvm,dirty-ring-size=N)",
            ));
        }
        Ok(())
    }
}

/// `set-vcpu-dirty-limit`: vCPU `cpu-index` (all if absent) may dirty at
/// most `dirty-rate` MB/s (0: cancel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SetVcpuDirtyLimitArgs {
    /// The vCPU (absent: every vCPU).
    #[serde(default)]
    pub cpu_index: Option<i64>,
    /// The quota, MB/s.
    pub dirty_rate: u64,
}

/// `cancel-vcpu-dirty-limit {cpu-index?}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CancelVcpuDirtyLimitArgs {
    /// The vCPU (absent: every vCPU).
    #[serde(default)]
    pub cpu_index: Option<i64>,
}

/// `query-dirty-rate {calc-time-unit?}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QueryDirtyRateArgs {
    /// The unit `calc-time` is shown in.
    #[serde(default)]
    pub calc_time_unit: Option<TimeUnit>,
}

/// `migrate-recover {uri}`: where a paused postcopy destination listens for
/// its source again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRecoverArgs {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub uri: String,
}

/// `migrate-continue {state}`: the status the migration is expected to be in
/// (normally `pre-switchover`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateContinueArgs {
    /// Expected current status.
    pub state: MigrationStatus,
}

/// Largest `downtime-limit`, in ms (QEMU's `MAX_MIGRATE_DOWNTIME`: 2000 s).
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// `migrate-set-parameters`: every field optional; only the fields given
/// change. Also usable as the shape of `query-migrate-parameters` (absent
/// fields are not serialized).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Maximum tolerated downtime, ms (≤ 2 000 000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Precopy bandwidth cap, bytes/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// COLO checkpoint period, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_checkpoint_delay: Option<u32>,
    /// Postcopy background bandwidth cap, bytes/s (0 = unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// auto-converge: first throttle, % (1-99).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    /// auto-converge: throttle step, % (1-99).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
    /// auto-converge: maximum throttle, % (1-99).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u8>,
    /// auto-converge: dirty/transferred ratio that triggers throttling, % (1-100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u8>,
    /// auto-converge: step only as far as the dirty rate needs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_tailslow: Option<bool>,
    /// Self-announce timing: refused (minivmm has no network device to
    /// announce).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_initial: Option<u64>,
    /// Refused, as `announce_initial`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_max: Option<u64>,
    /// Refused, as `announce_initial`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u64>,
    /// Refused, as `announce_initial`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_step: Option<u64>,
    /// multifd channel count: refused (multifd is not implemented).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    /// minivmm: longest a migration peer may make no progress, ms
    /// ([`PEER_TIMEOUT_RANGE_MS`]); applies to connections made after it is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_peer_timeout: Option<u64>,
    /// minivmm: a postcopy whose link breaks reconnects by itself for this
    /// long, ms (0 = off, the default; at most [`AUTO_RECOVER_MAX_MS`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_postcopy_auto_recover: Option<u64>,
    /// dirty-limit: each vCPU's quota while the migration does not
    /// converge, MB/s (1 or more).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_limit: Option<u64>,
    /// dirty-limit: the period the rates are measured over, ms (1-1000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_vcpu_dirty_limit_period: Option<u64>,
    /// minivmm: COLO in periodic mode (the secondary's guest stays paused
    /// between checkpoints) instead of with a running secondary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_colo_periodic: Option<bool>,
    /// minivmm: longest the COLO primary's output waits for the same from
    /// the secondary before a checkpoint, ms ([`COMPARE_TIMEOUT_RANGE_MS`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_colo_compare_timeout: Option<u64>,
    /// minivmm: on a COLO secondary, a file to append its own console
    /// output to while it runs beside the primary ("": dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_colo_secondary_log: Option<String>,
    /// The `tls-creds-x509` object the migration's connections use ("":
    /// none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The name the destination's certificate must carry ("": the URI's
    /// host).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// An authorization object: refused unless "" (not supported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}

/// Allowed `x-colo-compare-timeout`, ms: 1 ms to 1 h.
pub const COMPARE_TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 1..=3_600_000;

/// Largest `x-postcopy-auto-recover`, ms: 1 h.
pub const AUTO_RECOVER_MAX_MS: u64 = 3_600_000;

/// Allowed `x-peer-timeout`, ms: 1 s to 1 h.
pub const PEER_TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 1_000..=3_600_000;

impl MigrateSetParameters {
    /// The range checks QEMU's `migrate_params_check` makes on the values
    /// given (checks against values already set are the handler's job).
    pub fn check(&self) -> Result<(), QmpError> {
        let expects = |name: &str, what: &str| {
            Err(QmpError::generic(format!(
                "Parameter '{name}' expects {what}"
            )))
        };
        let pct = |v: Option<u8>, max: u8| v.is_some_and(|v| v < 1 || v > max);
        if pct(self.throttle_trigger_threshold, 100) {
            return expects(
                "throttle_trigger_threshold",
                "an integer in the range of 1 to 100",
            );
        }
        if pct(self.cpu_throttle_initial, 99) {
            return expects("cpu_throttle_initial", "an integer in the range of 1 to 99");
        }
        if pct(self.cpu_throttle_increment, 99) {
            return expects(
                "cpu_throttle_increment",
                "an integer in the range of 1 to 99",
            );
        }
        if pct(self.max_cpu_throttle, 99)
            || matches!((self.max_cpu_throttle, self.cpu_throttle_initial),
                        (Some(max), Some(init)) if max < init)
        {
            return expects(
                "max_cpu_throttle",
                "an integer in the range of cpu_throttle_initial to 99",
            );
        }
        if self
            .downtime_limit
            .is_some_and(|d| d > MAX_DOWNTIME_LIMIT_MS)
        {
            return expects(
                "downtime_limit",
                "an integer in the range of 0 to 2000 seconds",
            );
        }
        if self
            .x_peer_timeout
            .is_some_and(|t| !PEER_TIMEOUT_RANGE_MS.contains(&t))
        {
            return expects(
                "x_peer_timeout",
                "an integer in the range of 1000 to 3600000 milliseconds",
            );
        }
        if self
            .x_postcopy_auto_recover
            .is_some_and(|t| t > AUTO_RECOVER_MAX_MS)
        {
            return expects(
                "x_postcopy_auto_recover",
                "an integer in the range of 0 to 3600000 milliseconds",
            );
        }
        if self
            .x_colo_compare_timeout
            .is_some_and(|t| !COMPARE_TIMEOUT_RANGE_MS.contains(&t))
        {
            return expects(
                "x_colo_compare_timeout",
                "an integer in the range of 1 to 3600000 milliseconds",
            );
        }
        if self.multifd_channels == Some(0) {
            return expects("multifd_channels", "a value between 1 and 255");
        }
        if self
            .x_vcpu_dirty_limit_period
            .is_some_and(|p| !(1..=1000).contains(&p))
        {
            return expects("x-vcpu-dirty-limit-period", "a value between 1 and 1000");
        }
        if self.vcpu_dirty_limit == Some(0) {
            return Err(QmpError::generic(
                "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s",
            ));
        }
        // Known to QEMU, without effect here: refused rather than ignored.
        if self.tls_authz.as_deref().is_some_and(|a| !a.is_empty()) {
            return Err(QmpError::generic(
                "Parameter 'tls-authz' is not supported: minivmm has no authorization \
                 objects (a destination with verify-peer=on admits every client its CA signed)",
            ));
        }
        if self.multifd_channels.is_some() {
            return Err(QmpError::generic(
                "Parameter 'multifd-channels' is not supported: minivmm has no multifd",
            ));
        }
        let announce = [
            ("announce-initial", self.announce_initial),
            ("announce-max", self.announce_max),
            ("announce-rounds", self.announce_rounds),
            ("announce-step", self.announce_step),
        ];
        if let Some((name, _)) = announce.iter().find(|(_, v)| v.is_some()) {
            return Err(QmpError::generic(format!(
                "Parameter '{name}' is not supported: minivmm has no network device to announce"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorClass;

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn ok(name: &str, a: Value) -> Command {
        Command::parse(name, args(a)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn bad(name: &str, a: Value, desc: &str) {
        let e = Command::parse(name, args(a.clone())).unwrap_err();
        assert_eq!(e.class, ErrorClass::GenericError, "{name} {a}: {e}");
        assert!(
            e.desc.contains(desc),
            "{name} {a}: {:?} lacks {desc:?}",
            e.desc
        );
    }

    #[test]
    fn unknown_command() {
        let e = Command::parse("foo", Map::new()).unwrap_err();
        assert_eq!(e.class, ErrorClass::CommandNotFound);
        assert_eq!(e.desc, "The command foo has not been found");
    }

    #[test]
    fn every_name_is_known_and_canonical_names_are_listed() {
        for name in COMMAND_NAMES {
            match Command::parse(name, Map::new()) {
                Ok(cmd) => assert!(COMMAND_NAMES.contains(&cmd.name()), "{name}"),
                Err(e) => assert_eq!(e.class, ErrorClass::GenericError, "{name}: {e}"),
            }
        }
        let reply = query_commands_reply();
        assert_eq!(reply.as_array().unwrap().len(), COMMAND_NAMES.len());
        assert!(reply
            .as_array()
            .unwrap()
            .contains(&json!({"name": "migrate-cancel"})));
    }

    #[test]
    fn no_argument_commands() {
        assert_eq!(ok("query-status", json!({})), Command::QueryStatus);
        assert_eq!(ok("stop", json!({})).name(), "stop");
        bad(
            "query-status",
            json!({"foo": 1}),
            "Parameter 'foo' is unexpected",
        );
        bad("cont", json!({"x": null}), "Parameter 'x' is unexpected");
    }

    #[test]
    fn aliases() {
        assert_eq!(ok("migrate-cancel", json!({})), Command::MigrateCancel);
        assert_eq!(ok("migrate_cancel", json!({})), Command::MigrateCancel);
        assert_eq!(Command::MigrateCancel.name(), "migrate_cancel");
        assert_eq!(
            ok("migrate_start_postcopy", json!({})),
            Command::MigrateStartPostcopy
        );
        let c = ok(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "x-postcopy-ram", "state": true},
                {"capability": "postcopy-ram", "state": false},
                {"capability": "x-colo", "state": true},
                {"capability": "events", "state": true},
                {"capability": "return-path", "state": true},
                {"capability": "pause-before-switchover", "state": true},
                {"capability": "auto-converge", "state": true},
                {"capability": "postcopy-blocktime", "state": true},
                {"capability": "postcopy-preempt", "state": true},
                {"capability": "dirty-limit", "state": true},
            ]}),
        );
        let Command::MigrateSetCapabilities(a) = c else {
            panic!("{c:?}")
        };
        let caps: Vec<_> = a.capabilities.iter().map(|c| c.capability).collect();
        assert_eq!(caps[0], MigrationCapability::PostcopyRam);
        assert_eq!(caps[1], MigrationCapability::PostcopyRam);
        assert_eq!(&caps[1..], &MigrationCapability::ALL[..]);
        for c in MigrationCapability::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }

    #[test]
    fn capabilities_errors() {
        bad(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "foo", "state": true}]}),
            "Parameter 'capability' does not accept value 'foo'",
        );
        bad(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "xbzrle", "state": true}]}),
            "does not accept value 'xbzrle'",
        );
        bad(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events"}]}),
            "Parameter 'state' is missing",
        );
        bad(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": "on"}]}),
            "Invalid parameter type for 'state', expected: boolean",
        );
        bad(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": 3, "state": true}]}),
            "Invalid parameter type for 'capability', expected: string",
        );
        bad(
            "migrate-set-capabilities",
            json!({"capabilities": {"capability": "events", "state": true}}),
            "Invalid parameter type for 'capabilities', expected: array",
        );
        bad(
            "migrate-set-capabilities",
            json!({"capabilities": [7]}),
            "Invalid parameter type for 'capabilities[0]', expected: object",
        );
        bad(
            "migrate-set-capabilities",
            json!({}),
            "Parameter 'capabilities' is missing",
        );
    }

    #[test]
    fn pmemsave() {
        assert_eq!(
            ok(
                "pmemsave",
                json!({"val": 0, "size": 4096, "filename": "/tmp/m"})
            ),
            Command::Pmemsave(PmemsaveArgs {
                val: 0,
                size: 4096,
                filename: "/tmp/m".into()
            })
        );
        bad(
            "pmemsave",
            json!({"size": 1, "filename": "f"}),
            "Parameter 'val' is missing",
        );
        bad(
            "pmemsave",
            json!({"val": "0", "size": 1, "filename": "f"}),
            "Invalid parameter type for 'val', expected: integer",
        );
        bad(
            "pmemsave",
            json!({"val": 1.5, "size": 1, "filename": "f"}),
            "Invalid parameter type for 'val', expected: integer",
        );
        bad(
            "pmemsave",
            json!({"val": 0, "size": -1, "filename": "f"}),
            "Parameter 'size' expects uint64",
        );
        bad(
            "pmemsave",
            json!({"val": 0, "size": 1, "filename": null}),
            "Invalid parameter type for 'filename', expected: string",
        );
        bad(
            "pmemsave",
            json!({"val": 0, "size": 1, "filename": "f", "cpu-index": 0}),
            "Parameter 'cpu-index' is unexpected",
        );
        bad(
            "pmemsave",
            json!({"val": u64::MAX, "size": 2, "filename": "f"}),
            "beyond the 64-bit",
        );
        let c = ok(
            "memsave",
            json!({"val": 4096, "size": 1, "filename": "f", "cpu-index": 1}),
        );
        assert!(matches!(
            c,
            Command::Memsave(MemsaveArgs {
                cpu_index: Some(1),
                ..
            })
        ));
    }

    #[test]
    fn hmp() {
        let c = ok(
            "human-monitor-command",
            json!({"command-line": "info status"}),
        );
        assert_eq!(
            c,
            Command::HumanMonitorCommand(HumanMonitorCommandArgs {
                command_line: "info status".into(),
                cpu_index: None
            })
        );
        bad(
            "human-monitor-command",
            json!({}),
            "Parameter 'command-line' is missing",
        );
    }

    #[test]
    fn qmp_capabilities_args() {
        assert_eq!(
            ok("qmp_capabilities", json!({})),
            Command::QmpCapabilities(QmpCapabilitiesArgs { enable: None })
        );
        assert_eq!(
            ok("qmp_capabilities", json!({"enable": ["oob"]})),
            Command::QmpCapabilities(QmpCapabilitiesArgs {
                enable: Some(vec![QmpCapability::Oob])
            })
        );
        bad(
            "qmp_capabilities",
            json!({"enable": ["foo"]}),
            "Parameter 'enable[0]' does not accept value 'foo'",
        );
    }

    #[test]
    fn migrate_uri_and_channels() {
        assert_eq!(
            ok("migrate", json!({"uri": "tcp:0:4444", "detach": true})),
            Command::Migrate(MigrateArgs {
                uri: "tcp:0:4444".into(),
                resume: false
            })
        );
        bad("migrate", json!({}), "Parameter 'uri' is missing");
        bad(
            "migrate",
            json!({"uri": "unix:/x", "channels": []}),
            "'uri' and 'channels' arguments are mutually exclusive",
        );
        bad(
            "migrate",
            json!({"uri": "unix:/x", "blk": true}),
            "Parameter 'blk' is unexpected",
        );
        let chan = |addr: Value| json!({"channels": [{"channel-type": "main", "addr": addr}]});
        let uri = |addr: Value| match ok("migrate", chan(addr)) {
            Command::Migrate(a) => a.uri,
            c => panic!("{c:?}"),
        };
        assert_eq!(
            uri(json!({"transport": "socket", "type": "inet", "host": "10.0.0.1", "port": "1050"})),
            "tcp:10.0.0.1:1050"
        );
        assert_eq!(
            uri(json!({"transport": "socket", "type": "inet", "host": "::1", "port": "1"})),
            "tcp:[::1]:1"
        );
        assert_eq!(
            uri(json!({"transport": "socket", "type": "unix", "path": "/tmp/m"})),
            "unix:/tmp/m"
        );
        assert_eq!(
            uri(json!({"transport": "exec", "args": ["/bin/sh", "-c", "cat > /tmp/x"]})),
            "exec:cat > /tmp/x"
        );
        assert_eq!(
            uri(json!({"transport": "exec", "args": ["nc", "-U", "/a b"]})),
            "exec:nc -U '/a b'"
        );
        assert_eq!(
            uri(json!({"transport": "file", "filename": "/tmp/f", "offset": 4096})),
            "file:/tmp/f,offset=4096"
        );
        bad(
            "migrate",
            chan(json!({"transport": "pigeon"})),
            "Parameter 'transport' does not accept value 'pigeon'",
        );
        bad(
            "migrate",
            chan(json!({"transport": "socket", "type": "inet", "host": "h", "port": 5})),
            "Invalid parameter type for 'port', expected: string",
        );
        bad(
            "migrate",
            chan(json!({"transport": "rdma"})),
            "not supported",
        );
        bad("migrate", json!({"channels": []}), "Channel list is empty");
        bad(
            "migrate",
            json!({"channels": [{"channel-type": "cpr", "addr": {}}]}),
            "Parameter 'channel-type' does not accept value 'cpr'",
        );

        assert_eq!(
            ok("migrate-incoming", json!({"uri": "tcp:0:4444"})),
            Command::MigrateIncoming(MigrateIncomingArgs {
                uri: "tcp:0:4444".into(),
                exit_on_error: true
            })
        );
        assert_eq!(
            ok(
                "migrate-incoming",
                json!({"uri": "unix:/s", "exit-on-error": false})
            ),
            Command::MigrateIncoming(MigrateIncomingArgs {
                uri: "unix:/s".into(),
                exit_on_error: false
            })
        );
        bad("migrate-incoming", json!({}), "Parameter 'uri' is missing");
    }

    #[test]
    fn migrate_continue() {
        assert_eq!(
            ok("migrate-continue", json!({"state": "pre-switchover"})),
            Command::MigrateContinue(MigrateContinueArgs {
                state: MigrationStatus::PreSwitchover
            })
        );
        bad(
            "migrate-continue",
            json!({"state": "bogus"}),
            "Parameter 'state' does not accept value 'bogus'",
        );
    }

    #[test]
    fn parameters() {
        let c = ok(
            "migrate-set-parameters",
            json!({"downtime-limit": 500, "max-bandwidth": 1_000_000_000u64,
                   "x-checkpoint-delay": 200, "max-postcopy-bandwidth": 0,
                   "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                   "max-cpu-throttle": 99, "throttle-trigger-threshold": 50,
                   "cpu-throttle-tailslow": true}),
        );
        let Command::MigrateSetParameters(p) = c else {
            panic!("{c:?}")
        };
        assert_eq!(p.downtime_limit, Some(500));
        assert_eq!(p.x_checkpoint_delay, Some(200));
        assert_eq!(
            serde_json::to_value(MigrateSetParameters {
                downtime_limit: Some(300),
                ..Default::default()
            })
            .unwrap(),
            json!({"downtime-limit": 300})
        );
        ok(
            "migrate-set-parameters",
            json!({"downtime-limit": 2_000_000}),
        );
        // minivmm's bound on a silent peer: 1 s to 1 h.
        for t in [1_000, 3_600_000] {
            ok("migrate-set-parameters", json!({ "x-peer-timeout": t }));
        }
        for t in [999, 3_600_001] {
            bad(
                "migrate-set-parameters",
                json!({ "x-peer-timeout": t }),
                "Parameter 'x_peer_timeout' expects an integer in the range of 1000 to 3600000",
            );
        }
        // Automatic postcopy recovery: off (0) to 1 h.
        for t in [0, 3_600_000] {
            ok(
                "migrate-set-parameters",
                json!({ "x-postcopy-auto-recover": t }),
            );
        }
        bad(
            "migrate-set-parameters",
            json!({ "x-postcopy-auto-recover": 3_600_001 }),
            "Parameter 'x_postcopy_auto_recover' expects an integer in the range of 0 to 3600000",
        );
        // Postcopy recovery commands.
        assert_eq!(ok("migrate-pause", json!({})), Command::MigratePause);
        assert_eq!(
            ok("migrate-recover", json!({"uri": "tcp:0:4445"})),
            Command::MigrateRecover(MigrateRecoverArgs {
                uri: "tcp:0:4445".into()
            })
        );
        bad("migrate-recover", json!({}), "uri");
        bad(
            "migrate-set-parameters",
            json!({"downtime-limit": 2_000_001}),
            "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds",
        );
        bad(
            "migrate-set-parameters",
            json!({"downtime-limit": -1}),
            "Parameter 'downtime-limit' expects uint64",
        );
        bad(
            "migrate-set-parameters",
            json!({"max-cpu-throttle": 300}),
            "Parameter 'max-cpu-throttle' expects uint8",
        );
        bad(
            "migrate-set-parameters",
            json!({"max-cpu-throttle": 100}),
            "Parameter 'max_cpu_throttle' expects",
        );
        bad(
            "migrate-set-parameters",
            json!({"max-cpu-throttle": 30, "cpu-throttle-initial": 40}),
            "Parameter 'max_cpu_throttle' expects",
        );
        bad(
            "migrate-set-parameters",
            json!({"cpu-throttle-initial": 0}),
            "Parameter 'cpu_throttle_initial' expects",
        );
        bad(
            "migrate-set-parameters",
            json!({"throttle-trigger-threshold": 101}),
            "Parameter 'throttle_trigger_threshold' expects",
        );
        bad(
            "migrate-set-parameters",
            json!({"x-checkpoint-delay": 5_000_000_000u64}),
            "Parameter 'x-checkpoint-delay' expects uint32",
        );
        bad(
            "migrate-set-parameters",
            json!({"multifd-channels": 0}),
            "Parameter 'multifd_channels' expects",
        );
        // Settings without an effect here are refused, not ignored.
        bad(
            "migrate-set-parameters",
            json!({"multifd-channels": 2}),
            "Parameter 'multifd-channels' is not supported",
        );
        for name in [
            "announce-initial",
            "announce-max",
            "announce-rounds",
            "announce-step",
        ] {
            bad(
                "migrate-set-parameters",
                json!({ name: 100 }),
                &format!("Parameter '{name}' is not supported"),
            );
        }
        bad(
            "migrate-set-parameters",
            json!({"xbzrle-cache-size": 1}),
            "Parameter 'xbzrle-cache-size' is unexpected",
        );
        bad(
            "migrate-set-parameters",
            json!({"downtime-limit": "300"}),
            "Invalid parameter type for 'downtime-limit', expected: integer",
        );
    }
}
