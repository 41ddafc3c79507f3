//! QMP and HMP commands: what each does to the VM, its run state and its
//! migrations. The QMP server parses and checks the arguments
//! (`qmp::Command`); the commands it answers itself (`qmp_capabilities`,
//! `query-version`, `query-commands`) never reach here.

use qmp::DirtyRateMode;
use std::io::Write;

use qmp::{Command, QmpError};
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use migration::status::Status;

use super::migrations::{ColoMode, IncomingStartError};
use super::runstate::{self, Input, RunState};
use super::{generic, Control, ControlError};
use crate::cli::Incoming as CliIncoming;
use crate::vm::VmError;

/// A failure of the VM behind a command, as a QMP error.
fn control_err(e: ControlError) -> QmpError {
    generic(migration::error_chain(&e))
}

impl Control {
    fn pmemsave(&self, val: u64, size: u64, filename: &str) -> Result<(), QmpError> {
        let mem = self.vm.memory();
        let layout = &self.vm.shape().layout;
        let end = val
            .checked_add(size)
            .ok_or_else(|| generic("Invalid parameter 'size'"))?;
        if !layout.ranges.iter().any(|&(s, l)| val >= s && end <= s + l) {
            return Err(generic(format!(
                "pmemsave: [{val:#x}, {end:#x}) is not inside one guest RAM range {:?}",
                layout
                    .ranges
                    .iter()
                    .map(|&(s, l)| format!("[{s:#x}, {:#x})", s + l))
                    .collect::<Vec<_>>()
            )));
        }
        let mut f = std::fs::File::create(filename)
            .map_err(|e| generic(format!("Could not open '{filename}': {e}")))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut addr = val;
        while addr < end {
            let n = ((end - addr) as usize).min(buf.len());
            mem.read_slice(&mut buf[..n], GuestAddress(addr))
                .map_err(|e| generic(format!("pmemsave: reading {addr:#x}: {e}")))?;
            f.write_all(&buf[..n])
                .map_err(|e| generic(format!("writing '{filename}': {e}")))?;
            addr += n as u64;
        }
        Ok(())
    }

    fn hmp(&mut self, line: &str) -> Result<Value, QmpError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = match words.as_slice() {
            ["info", "status"] => format!(
                "VM status: {}\r\n",
                match self.runstate {
                    RunState::Running => "running".to_string(),
                    RunState::Paused => "paused".to_string(),
                    s => format!("paused ({})", s.as_str()),
                }
            ),
            ["info", "version"] => format!("{} (minivmm)\r\n", env!("CARGO_PKG_VERSION")),
            ["info", "name"] => format!("{}\r\n", self.config.name.clone().unwrap_or_default()),
            ["info", "migrate"] => hmp_info_migrate(&self.mig.query()),
            ["info", "migrate_capabilities"] => self
                .mig
                .caps
                .to_json()
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let on = c["state"].as_bool().unwrap_or(false);
                    format!(
                        "{}: {}\r\n",
                        c["capability"].as_str().unwrap_or(""),
                        if on { "on" } else { "off" }
                    )
                })
                .collect(),
            ["info", "migrate_parameters"] => hmp_migrate_parameters(&self.mig.params.to_json()),
            ["info", "kvm"] => "kvm support: enabled\r\n".to_string(),
            ["info", "registers"] => self.hmp_registers()?,
            ["help" | "?"] => HMP_HELP.replace('\n', "\r\n"),
            ["info", "cpus"] => self
                .vm
                .vcpu_threads()
                .iter()
                .enumerate()
                .map(|(i, tid)| {
                    format!(
                        "{}CPU #{i}: thread_id={tid}\r\n",
                        if i == 0 { "* " } else { "  " },
                    )
                })
                .collect(),
            ["stop"] => {
                self.execute(Command::Stop)?;
                String::new()
            }
            ["cont" | "c"] => {
                self.execute(Command::Cont)?;
                String::new()
            }
            ["quit" | "q"] => {
                self.execute(Command::Quit)?;
                String::new()
            }
            [] => String::new(),
            [cmd, ..] => format!("unknown command: '{cmd}'\r\n"),
        };
        Ok(json!(out))
    }

    /// HMP `info registers`: vCPU 0's registers in QEMU's layout (the
    /// vCPUs are paused for the moment it takes to read them).
    fn hmp_registers(&mut self) -> Result<String, QmpError> {
        if self.mig.active() {
            return Err(generic("info registers: not while a migration runs"));
        }
        let was = self.vm.is_running();
        let st = self.vm.pause_and_save();
        if was {
            self.vm
                .resume()
                .map_err(|e| generic(migration::error_chain(&e)))?;
        }
        let st = st.map_err(|e| generic(migration::error_chain(&e)))?;
        let Some(v) = st.vcpus.first() else {
            return Ok(String::new());
        };
        let (r, s) = (&v.regs, &v.sregs);
        let mut o = format!(
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\r\n\
             RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\r\n\
             R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\r\n\
             R12={:016x} R13={:016x} R14={:016x} R15={:016x}\r\n\
             RIP={:016x} RFL={:08x} CPL={} HLT={}\r\n",
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.rsp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15,
            r.rip,
            r.rflags,
            s.cs.dpl,
            u8::from(v.mp_state.mp_state == kvm_bindings::KVM_MP_STATE_HALTED),
        );
        for (n, g) in [
            ("ES", &s.es),
            ("CS", &s.cs),
            ("SS", &s.ss),
            ("DS", &s.ds),
            ("FS", &s.fs),
            ("GS", &s.gs),
            ("LDT", &s.ldt),
            ("TR", &s.tr),
        ] {
            o += &format!(
                "{n:<3}={:04x} {:016x} {:08x} {:08x}\r\n",
                g.selector,
                g.base,
                g.limit,
                (u32::from(g.type_) << 8)
                    | (u32::from(g.present) << 15)
                    | (u32::from(g.dpl) << 13)
                    | (u32::from(g.s) << 12)
                    | (u32::from(g.l) << 21)
                    | (u32::from(g.db) << 22)
                    | (u32::from(g.g) << 23)
            );
        }
        o += &format!(
            "GDT=     {:016x} {:08x}\r\nIDT=     {:016x} {:08x}\r\n\
             CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x}\r\nEFER={:016x}\r\n",
            s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        );
        Ok(o)
    }

    /// `query-chardev`: the serial console's backend and the monitors.
    fn chardevs(&self) -> Value {
        use crate::cli::SerialSpec;
        let serial = match (&self.config.serial, &self.pty) {
            (SerialSpec::Stdio, _) => "stdio".to_string(),
            (SerialSpec::File(p), _) => format!("file:{}", p.display()),
            (SerialSpec::Pty, Some(p)) => format!("pty:{}", p.path),
            (SerialSpec::Pty, None) | (SerialSpec::None, _) => "null".to_string(),
        };
        let mut out = vec![json!({
            "label": self.config.serial_label,
            "filename": serial,
            "frontend-open": true,
        })];
        for (i, q) in self.config.qmp.iter().chain(&self.config.hmp).enumerate() {
            out.push(json!({
                "label": format!("compat_monitor{i}"),
                "filename": q,
                "frontend-open": true,
            }));
        }
        Value::Array(out)
    }

    pub(super) fn execute(&mut self, cmd: Command) -> Result<Value, QmpError> {
        let vm_err = |e: VmError| generic(migration::error_chain(&e));
        match cmd {
            Command::QueryStatus => Ok(json!({
                "running": self.runstate == RunState::Running,
                "status": self.runstate.as_str(),
            })),
            Command::QueryName => Ok(match &self.config.name {
                Some(n) => json!({"name": n}),
                None => json!({}),
            }),
            Command::Stop => {
                // QEMU: stop during inmigrate keeps the guest paused after migration.
                let vcpus_running = self.vm.is_running();
                // In COLO, also when a checkpoint has it stopped now: it
                // stays stopped after the checkpoint.
                if self.mig.colo_mode != ColoMode::None {
                    self.mig.colo_user_paused = true;
                }
                self.enter(Input::Stop { vcpus_running })
                    .map_err(control_err)?;
                Ok(json!({}))
            }
            Command::Cont => {
                let input = Input::Cont {
                    memory_incomplete: self.mig.guest_incomplete,
                    colo: self.mig.colo_mode != ColoMode::None,
                };
                let step = runstate::step(self.runstate, input).map_err(|e| generic(e.to_string()))?;
                self.apply(step).map_err(control_err)?;
                Ok(json!({}))
            }
            Command::Quit => {
                self.shutdown_event("host-qmp-quit", false);
                self.quit = true;
                Ok(json!({}))
            }
            Command::SystemReset => {
                self.vm.reset().map_err(vm_err)?;
                self.events.send("RESET", Some(json!({"guest": false, "reason": "host-qmp-system-reset"})));
                Ok(json!({}))
            }
            Command::SystemPowerdown => Err(generic(
                "system_powerdown needs ACPI, which minivmm does not emulate; use quit, or poweroff/reboot inside the guest",
            )),
            // Each vCPU's own thread (what a tool pins), and the topology
            // the guest sees: the cores of one socket.
            Command::QueryCpusFast => Ok(Value::Array(
                self.vm
                    .vcpu_threads()
                    .iter()
                    .enumerate()
                    .map(|(i, tid)| {
                        json!({
                            "cpu-index": i,
                            "qom-path": format!("/machine/unattached/device[{i}]"),
                            "thread-id": tid,
                            "target": "x86_64",
                            "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
                        })
                    })
                    .collect(),
            )),
            Command::QueryMachines => Ok(json!([
                {"name": "minivmm", "alias": "pc", "is-default": true, "cpu-max": crate::mptable::MAX_VCPUS,
                 "hotpluggable-cpus": false, "numa-mem-supported": false, "deprecated": false,
                 "default-cpu-type": "minivmm64-x86_64-cpu", "acpi": false},
            ])),
            Command::QueryCpuDefinitions => Ok(json!([
                {"name": "minivmm64", "typename": "minivmm64-x86_64-cpu", "static": false,
                 "migration-safe": true, "deprecated": false, "unavailable-features": []},
                {"name": "host", "typename": "host-x86_64-cpu", "static": false,
                 "migration-safe": false, "deprecated": false, "unavailable-features": []},
            ])),
            Command::QueryKvm => Ok(json!({"enabled": true, "present": true})),
            Command::QueryTarget => Ok(json!({"arch": "x86_64"})),
            // No CPU hotplug: every possible CPU is present, none can be added.
            Command::QueryHotpluggableCpus => Ok(Value::Array(
                (0..self.vm.shape().vcpus)
                    .map(|i| {
                        json!({
                            "type": format!("{}-x86_64-cpu", self.config.cpu.name()),
                            "vcpus-count": 1,
                            "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
                            "qom-path": format!("/machine/unattached/device[{i}]"),
                        })
                    })
                    .collect(),
            )),
            Command::ObjectAdd(a) => {
                if self.tls_creds.iter().any(|c| c.id == a.id) {
                    return Err(generic(format!(
                        "attempt to add duplicate property '{}' to object (type 'container')",
                        a.id
                    )));
                }
                let dir = a
                    .dir
                    .ok_or_else(|| generic("Parameter 'dir' is missing"))?;
                let endpoint = match a.endpoint.as_deref() {
                    Some("server") => migration::tls::Endpoint::Server,
                    _ => migration::tls::Endpoint::Client,
                };
                let c = migration::tls::TlsCreds::load(
                    &a.id,
                    std::path::Path::new(&dir),
                    endpoint,
                    a.verify_peer.unwrap_or(true),
                )
                .map_err(|e| generic(migration::error_chain(&e)))?;
                self.tls_creds.push(std::sync::Arc::new(c));
                Ok(json!({}))
            }
            Command::ObjectDel(a) => {
                if a.id == self.mig.params.tls_creds && self.mig.active() {
                    return Err(generic(format!(
                        "object '{}' is in use, can not be deleted",
                        a.id
                    )));
                }
                let n = self.tls_creds.len();
                self.tls_creds.retain(|c| c.id != a.id);
                if self.tls_creds.len() == n {
                    return Err(generic(format!("object '{}' not found", a.id)));
                }
                Ok(json!({}))
            }
            Command::QueryUuid => Ok(json!({
                "UUID": self.config.uuid.as_deref().unwrap_or("00000000-0000-0000-0000-000000000000")
            })),
            Command::QueryMemorySizeSummary => Ok(json!({"base-memory": self.config.mem_size})),
            Command::QueryChardev => Ok(self.chardevs()),
            Command::Pmemsave(a) => {
                self.pmemsave(a.val, a.size, &a.filename)?;
                Ok(json!({}))
            }
            Command::Memsave(_) => Err(generic("memsave is not supported; use pmemsave with a guest-physical address")),
            Command::HumanMonitorCommand(a) => self.hmp(&a.command_line),
            Command::QmpCapabilities(_)
            | Command::QueryVersion
            | Command::QueryCommands
            | Command::QueryQmpSchema => {
                Err(generic("handled by the QMP server"))
            }
            cmd => self.migration_command(cmd),
        }
    }

    /// The migration commands (`migrate`, `migrate-set-*`, `query-migrate*`,
    /// postcopy and COLO).
    fn migration_command(&mut self, cmd: Command) -> Result<Value, QmpError> {
        match cmd {
            Command::Migrate(a) if !known_scheme(&a.uri) => Err(generic(
                "Parameter 'uri' expects a valid migration protocol",
            )),
            Command::Migrate(a) => self.migrate(&a.uri, a.resume),
            Command::MigrateIncoming(a) => {
                if self.config.incoming != Some(CliIncoming::Defer) {
                    // QEMU's words, with or without another -incoming.
                    return Err(generic("For use with '-incoming defer'"));
                }
                if !known_scheme(&a.uri) {
                    return Err(generic(format!("unknown migration protocol: {}", a.uri)));
                }
                if self.mig.incoming.is_some() || self.runstate != RunState::InMigrate {
                    return Err(generic("The incoming migration has already been started"));
                }
                self.mig.exit_on_error = a.exit_on_error;
                self.start_incoming(&a.uri).map_err(|e| match e {
                    IncomingStartError::Transport(t) => generic(migration::error_chain(&t)),
                    IncomingStartError::Other(s) => generic(s),
                })?;
                Ok(json!({}))
            }
            Command::MigrateCancel => {
                if let Some(s) = &self.mig.outgoing {
                    if s.cancel() && self.mig.caps.events {
                        self.events
                            .send("MIGRATION", Some(json!({"status": "cancelling"})));
                    }
                }
                Ok(json!({}))
            }
            Command::MigratePause => {
                let paused = [&self.mig.outgoing, &self.mig.incoming]
                    .into_iter()
                    .flatten()
                    .any(|s| s.pause());
                if paused {
                    Ok(json!({}))
                } else {
                    Err(generic(
                        "migrate-pause is currently only supported during postcopy-active or postcopy-recover state",
                    ))
                }
            }
            Command::MigrateRecover(a) => {
                let Some(inc) = self
                    .mig
                    .incoming
                    .as_ref()
                    .filter(|s| s.status() == Status::PostcopyPaused)
                else {
                    return Err(generic(
                        "Migrate recover can only be run when postcopy is paused.",
                    ));
                };
                let uri =
                    migration::transport::Uri::parse(&a.uri).map_err(|e| generic(e.to_string()))?;
                if !uri.duplex() {
                    return Err(generic(format!(
                        "postcopy recovery needs a return path: use tcp: or unix:, not '{}'",
                        a.uri
                    )));
                }
                let l = migration::transport::Listener::bind(&uri)
                    .map_err(|e| generic(migration::error_chain(&e)))?;
                inc.request_recover(migration::status::Recover::Listen(l));
                Ok(json!({}))
            }
            Command::MigrateContinue(_) => match &self.mig.outgoing {
                Some(s) if s.status() == Status::PreSwitchover => {
                    s.release_switchover();
                    Ok(json!({}))
                }
                _ => Err(generic("Migration not in pre-switchover state")),
            },
            Command::MigrateSetCapabilities(a) => {
                if self.mig.active() {
                    return Err(generic("There's a migration process in progress"));
                }
                let mut caps = self.mig.caps;
                for c in a.capabilities {
                    caps.set(c.capability.as_str(), c.state)
                        .map_err(|e| generic(e.to_string()))?;
                }
                caps.check().map_err(|e| generic(e.to_string()))?;
                if caps.dirty_limit && self.vm.dirty_rings().is_none() {
                    return Err(generic(
                        "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set",
                    ));
                }
                self.mig.caps = caps;
                Ok(json!({}))
            }
            Command::QueryMigrateCapabilities => Ok(self.mig.caps.to_json()),
            Command::MigrateSetParameters(p) => {
                let p = *p;
                let mut n = self.mig.params.clone();
                // Refusals first: a refused request changes nothing.
                if p.x_colo_periodic.is_some_and(|v| v != n.x_colo_periodic) && self.mig.active() {
                    // Chosen when COLO starts (the secondary follows the
                    // primary): not while one runs.
                    return Err(generic(
                        "x-colo-periodic cannot be changed while a migration or COLO runs",
                    ));
                }
                if p.x_peer_timeout.is_some_and(|v| v != n.x_peer_timeout_ms)
                    && self.mig.connected()
                {
                    // Each socket takes its bounds (and each keepalive its
                    // period) as it is made.
                    return Err(generic(
                        "x-peer-timeout cannot be changed while a migration is connected: \
                         it bounds a connection as it is made (set it before migrate or \
                         migrate-incoming, or while a postcopy is paused on the destination)",
                    ));
                }
                if let Some(v) = p.downtime_limit {
                    n.downtime_limit_ms = v;
                }
                if let Some(v) = p.max_bandwidth {
                    n.max_bandwidth = v;
                }
                if let Some(v) = p.x_checkpoint_delay {
                    n.x_checkpoint_delay_ms = u64::from(v);
                    // A running COLO primary waits this long from its
                    // next checkpoint on (as QEMU).
                    if let Some(out) = &self.mig.outgoing {
                        out.set_checkpoint_delay_ms(n.x_checkpoint_delay_ms);
                    }
                }
                if let Some(v) = p.max_postcopy_bandwidth {
                    n.max_postcopy_bandwidth = v;
                }
                if let Some(v) = p.cpu_throttle_initial {
                    n.cpu_throttle_initial = v;
                }
                if let Some(v) = p.cpu_throttle_increment {
                    n.cpu_throttle_increment = v;
                }
                if let Some(v) = p.max_cpu_throttle {
                    n.max_cpu_throttle = v;
                }
                if let Some(v) = p.throttle_trigger_threshold {
                    n.throttle_trigger_threshold = v;
                }
                if let Some(v) = p.cpu_throttle_tailslow {
                    n.cpu_throttle_tailslow = v;
                }
                if let Some(v) = p.vcpu_dirty_limit {
                    n.vcpu_dirty_limit = v;
                }
                if let Some(v) = p.x_vcpu_dirty_limit_period {
                    n.x_vcpu_dirty_limit_period_ms = v;
                }
                if let Some(out) = &self.mig.outgoing {
                    // The running migration paces and decides by these
                    // from its next write and sync on (as QEMU).
                    out.set_bandwidths(n.max_bandwidth, n.max_postcopy_bandwidth);
                    out.set_downtime_limit_ms(n.downtime_limit_ms);
                }
                if let Some(v) = p.x_peer_timeout {
                    n.x_peer_timeout_ms = v;
                    // A destination still waiting for its source uses it.
                    if let Some(inc) = &self.mig.incoming {
                        inc.set_peer_timeout_ms(v);
                    }
                }
                if let Some(v) = p.x_colo_periodic {
                    n.x_colo_periodic = v;
                }
                if let Some(v) = p.x_colo_secondary_log {
                    // Kept only while this side forwards its output as a
                    // running COLO secondary; opened (and so checked) now.
                    let log: Option<Box<dyn std::io::Write + Send>> = if v.is_empty() {
                        None
                    } else {
                        let f = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&v)
                            .map_err(|e| {
                                generic(format!("x-colo-secondary-log: cannot open '{v}': {e}"))
                            })?;
                        Some(Box::new(f))
                    };
                    self.gate.set_log(log);
                    n.x_colo_secondary_log = v;
                }
                if let Some(v) = p.x_colo_compare_timeout {
                    n.x_colo_compare_timeout_ms = v;
                    if let Some(out) = &self.mig.outgoing {
                        out.set_compare_timeout_ms(v);
                    }
                }
                if let Some(v) = p.tls_creds {
                    if !v.is_empty() && !self.tls_creds.iter().any(|c| c.id == v) {
                        return Err(generic(format!("No TLS credentials with id '{v}'")));
                    }
                    if v != n.tls_creds && self.mig.outgoing.is_some() {
                        return Err(generic(
                            "tls-creds cannot be changed while a migration runs",
                        ));
                    }
                    n.tls_creds = v;
                }
                if let Some(v) = p.tls_hostname {
                    n.tls_hostname = v;
                }
                if let Some(v) = p.tls_authz {
                    n.tls_authz = v;
                }
                if let Some(v) = p.x_postcopy_auto_recover {
                    n.x_postcopy_auto_recover_ms = v;
                    // Read when a postcopy pauses: a running one takes it.
                    for s in [&self.mig.outgoing, &self.mig.incoming]
                        .into_iter()
                        .flatten()
                    {
                        s.set_auto_recover_ms(v);
                    }
                }
                // An incoming migration waiting for its source takes the
                // credentials when the source connects (as QEMU).
                if let Some(inc) = self
                    .mig
                    .incoming
                    .as_ref()
                    .filter(|i| i.status() == Status::Setup)
                {
                    inc.set_tls_server(self.server_tls(&n.tls_creds).map_err(generic)?);
                }
                self.mig.params = n;
                Ok(json!({}))
            }
            Command::QueryMigrateParameters => Ok(self.mig.params.to_json()),
            Command::QueryMigrate => Ok(self.mig.query()),
            Command::MigrateStartPostcopy => {
                match &self.mig.outgoing {
                    Some(s) => {
                        if !self.mig.outgoing_postcopy {
                            return Err(generic("Enable postcopy with migrate_set_capability before the start of migration"));
                        }
                        s.request_postcopy();
                        Ok(json!({}))
                    }
                    // After the end (or before any migration): nothing to switch.
                    None if self.mig.last_outgoing.status() != Status::None => Ok(json!({})),
                    None => Err(generic(
                        "Postcopy must be started after migration has been started",
                    )),
                }
            }
            Command::XColoLostHeartbeat => match self.mig.colo_mode {
                ColoMode::Primary => {
                    self.mig.last_outgoing.request_failover(false);
                    Ok(json!({}))
                }
                ColoMode::Secondary => {
                    self.mig.last_incoming.request_failover(true);
                    Ok(json!({}))
                }
                ColoMode::None => Err(generic("The feature 'colo' is not enabled")),
            },
            Command::QueryColoStatus => Ok(self.mig.colo_status()),
            Command::CalcDirtyRate(a) => {
                if self.dirty_rate.measuring() {
                    return Err(generic(
                        "the previous dirty rate calculation is still running",
                    ));
                }
                if self.mig.outgoing.is_some() || self.mig.incoming.is_some() {
                    return Err(generic(
                        "a migration drives the dirty log: no dirty rate calculation meanwhile",
                    ));
                }
                let rings = self.vm.dirty_rings().cloned();
                let mode = match (a.mode, rings.is_some()) {
                    (None, true) | (Some(DirtyRateMode::DirtyRing), true) => {
                        DirtyRateMode::DirtyRing
                    }
                    (None, false) | (Some(DirtyRateMode::DirtyBitmap), false) => {
                        DirtyRateMode::DirtyBitmap
                    }
                    (Some(DirtyRateMode::DirtyRing), false) => {
                        return Err(generic(
                            "mode dirty-ring is not enabled, use other method instead \
                             (-accel kvm,dirty-ring-size=N)",
                        ))
                    }
                    (Some(m), _) => {
                        return Err(generic(format!(
                            "mode {} is not supported with the dirty ring on; use dirty-ring",
                            m.as_str()
                        )))
                    }
                };
                let unit = a.calc_time_unit.unwrap_or_default();
                self.dirty_rate
                    .start(
                        (self.vm.fd().clone(), self.vm.memory().clone(), rings),
                        a.calc_time_ms(),
                        unit,
                        mode,
                    )
                    .map_err(|e| generic(format!("cannot start the calculation: {e}")))?;
                Ok(json!({}))
            }
            Command::QueryDirtyRate(a) => Ok(self.dirty_rate.query(a.calc_time_unit)),
            Command::SetVcpuDirtyLimit(a) => {
                let vm = self.limit_vm()?;
                let cpu = self.cpu_index(a.cpu_index)?;
                if a.dirty_rate == 0 {
                    self.dirty_limit.cancel(cpu);
                    return Ok(json!({}));
                }
                self.dirty_limit
                    .set(&vm, cpu, a.dirty_rate)
                    .map_err(|e| generic(format!("cannot start the dirty limit: {e}")))?;
                Ok(json!({}))
            }
            Command::CancelVcpuDirtyLimit(a) => {
                self.limit_vm()?;
                let cpu = self.cpu_index(a.cpu_index)?;
                self.dirty_limit.cancel(cpu);
                Ok(json!({}))
            }
            Command::QueryVcpuDirtyLimit => Ok(self.dirty_limit.query()),
            _ => Err(generic("not a migration command")),
        }
    }

    /// The VM as the dirty limit needs it, or QEMU's refusal without rings.
    fn limit_vm(&self) -> Result<crate::dirtylimit::LimitVm, QmpError> {
        self.vm.limit_vm().ok_or_else(|| {
            generic(
                "dirty page limit feature requires KVM with accelerator property \
                 'dirty-ring-size' set'",
            )
        })
    }

    /// A `cpu-index` argument: a vCPU of this VM, or all (`None`).
    fn cpu_index(&self, i: Option<i64>) -> Result<Option<usize>, QmpError> {
        match i {
            None => Ok(None),
            Some(i) if (0..i64::from(self.vm.shape().vcpus)).contains(&i) => Ok(Some(i as usize)),
            Some(_) => Err(generic("incorrect cpu index specified")),
        }
    }
}

/// Whether `uri` names a transport QEMU knows (others get QEMU's "not a
/// migration protocol" errors; known ones minivmm lacks get its reason).
fn known_scheme(uri: &str) -> bool {
    matches!(
        uri.split(':').next(),
        Some("tcp" | "unix" | "exec" | "file" | "fd" | "rdma" | "vsock")
    )
}

/// HMP `help`: the commands `human-monitor-command` runs.
const HMP_HELP: &str = "\
c|cont -- resume emulation
help|? -- show the help
info cpus -- show infos for each CPU
info kvm -- show KVM information
info migrate -- show migration status
info migrate_capabilities -- show current migration capabilities
info migrate_parameters -- show current migration parameters
info name -- show the current VM name
info registers -- show the cpu registers
info status -- show the current VM status (running|paused)
info version -- show the version of QEMU
q|quit -- quit the emulator
stop -- stop emulation
";

/// HMP `info migrate` in QEMU 7.2's layout, from `query-migrate`'s reply.
fn hmp_info_migrate(j: &Value) -> String {
    // What minivmm's stream always does, in QEMU's words.
    let mut s = String::from(
        "globals:\r\nstore-global-state: on\r\nonly-migratable: off\r\n\
         send-configuration: on\r\nsend-section-footer: on\r\n",
    );
    let u = |k: &str| j.get(k).and_then(Value::as_u64);
    if let Some(st) = j.get("status").and_then(Value::as_str) {
        s += &format!("Migration status: {st}");
        match j.get("error-desc").and_then(Value::as_str) {
            Some(e) if st == "failed" => s += &format!(" ({e})\r\n"),
            _ => s += "\r\n",
        }
        s += &format!("total time: {} ms\r\n", u("total-time").unwrap_or(0));
        if let Some(v) = u("expected-downtime") {
            s += &format!("expected downtime: {v} ms\r\n");
        }
        if let Some(v) = u("downtime") {
            s += &format!("downtime: {v} ms\r\n");
        }
        if let Some(v) = u("setup-time") {
            s += &format!("setup: {v} ms\r\n");
        }
    }
    if let Some(ram) = j.get("ram") {
        let r = |k: &str| ram.get(k).and_then(Value::as_u64).unwrap_or(0);
        s += &format!(
            "transferred ram: {} kbytes\r\nthroughput: {:.2} mbps\r\n\
             remaining ram: {} kbytes\r\ntotal ram: {} kbytes\r\n\
             duplicate: {} pages\r\nskipped: 0 pages\r\nnormal: {} pages\r\n\
             normal bytes: {} kbytes\r\ndirty sync count: {}\r\npage size: {} kbytes\r\n\
             multifd bytes: 0 kbytes\r\n",
            r("transferred") >> 10,
            ram.get("mbps").and_then(Value::as_f64).unwrap_or(0.0),
            r("remaining") >> 10,
            r("total") >> 10,
            r("duplicate"),
            r("normal"),
            r("normal-bytes") >> 10,
            r("dirty-sync-count"),
            r("page-size") >> 10,
        );
        if r("dirty-pages-rate") > 0 {
            s += &format!("dirty pages rate: {} pages\r\n", r("dirty-pages-rate"));
        }
        if r("postcopy-requests") > 0 {
            s += &format!("postcopy request count: {}\r\n", r("postcopy-requests"));
        }
    }
    if let Some(v) = u("cpu-throttle-percentage") {
        s += &format!("cpu throttle percentage: {v}\r\n");
    }
    s
}

/// HMP `info migrate_parameters`: `name: value` with QEMU's units.
fn hmp_migrate_parameters(p: &Value) -> String {
    let Some(m) = p.as_object() else {
        return String::new();
    };
    m.iter()
        .map(|(k, v)| {
            let unit = match k.as_str() {
                "downtime-limit"
                | "x-checkpoint-delay"
                | "x-peer-timeout"
                | "x-postcopy-auto-recover"
                | "x-vcpu-dirty-limit-period"
                | "x-colo-compare-timeout" => " ms",
                "max-bandwidth" | "max-postcopy-bandwidth" => " bytes/second",
                "cpu-throttle-initial"
                | "cpu-throttle-increment"
                | "max-cpu-throttle"
                | "throttle-trigger-threshold" => " %",
                "vcpu-dirty-limit" => " MB/s",
                _ => "",
            };
            let v = match v {
                Value::Bool(b) => (if *b { "on" } else { "off" }).to_string(),
                Value::String(s) => format!("'{s}'"),
                v => v.to_string(),
            };
            format!("{k}: {v}{unit}\r\n")
        })
        .collect()
}
