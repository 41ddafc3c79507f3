//! QEMU's run states and every transition between them, as one pure
//! function ([`step`]): the control loop asks it what a command or event
//! does, then carries out the answer (pauses or resumes the vCPUs, sends
//! the QMP events). Nothing here touches the VM.

/// QEMU's run states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Created with -S, never started.
    Prelaunch,
    /// Running.
    Running,
    /// Stopped by the user.
    Paused,
    /// Waiting for an incoming migration.
    InMigrate,
    /// Stopped for a migration's final round.
    FinishMigrate,
    /// Stopped after a successful outgoing migration.
    PostMigrate,
    /// The guest powered off.
    Shutdown,
    /// KVM could not run the guest.
    InternalError,
    /// Stopped for a COLO checkpoint (primary) or kept as the COLO secondary.
    Colo,
}

impl RunState {
    /// QMP name (`query-status`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prelaunch => "prelaunch",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::InMigrate => "inmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::PostMigrate => "postmigrate",
            Self::Shutdown => "shutdown",
            Self::InternalError => "internal-error",
            Self::Colo => "colo",
        }
    }

    /// The state at start-up: `-S` starts in prelaunch.
    pub fn initial(start_paused: bool) -> Self {
        if start_paused {
            Self::Prelaunch
        } else {
            Self::Running
        }
    }
}

/// What happened, as the run state sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// QMP `stop`; `vcpus_running`: the vCPUs run now.
    Stop {
        /// The vCPUs run now.
        vcpus_running: bool,
    },
    /// QMP `cont`.
    Cont {
        /// A postcopy failed after this destination started the guest.
        memory_incomplete: bool,
        /// COLO is on (primary or secondary).
        colo: bool,
    },
    /// A migration stopped the vCPUs for its final round, the postcopy
    /// switch or a COLO checkpoint (`colo_primary`).
    MigrationStopped {
        /// A COLO checkpoint on the primary.
        colo_primary: bool,
    },
    /// A migration that stopped the vCPUs gives them back (it failed, or a
    /// COLO checkpoint is done).
    MigrationResume {
        /// They ran before the migration, or this is a COLO primary.
        run: bool,
    },
    /// An incoming migration loaded the device state.
    IncomingLoaded {
        /// The guest runs now (it ran on the source, and no `-S`/`stop`).
        run: bool,
    },
    /// A COLO secondary loaded a checkpoint (the guest stays paused).
    ColoCheckpoint,
    /// A COLO secondary takes over: the guest runs here.
    ColoTakeover,
    /// COLO ended on this side.
    ColoExit,
    /// A postcopy destination gives up after it started the guest.
    PostcopyAbandoned {
        /// The vCPUs run now.
        vcpus_running: bool,
    },
    /// The outgoing migration ended; `source_done`: the guest now lives on
    /// the destination (completed, or postcopy failed after the switch).
    OutgoingEnded {
        /// The guest must not run here any more.
        source_done: bool,
    },
    /// An incoming migration starts listening.
    IncomingStarted,
    /// The guest powered off.
    GuestShutdown,
    /// KVM could not run the guest.
    GuestFatal,
}

/// What the vCPUs must do for a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vcpus {
    /// Leave them as they are.
    Keep,
    /// Pause them (QMP event `STOP`).
    Pause,
    /// Start them (QMP event `RESUME`).
    Resume,
}

/// The answer of [`step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Go to `state`, doing `vcpus` first.
    To(RunState, Vcpus),
    /// Nothing changes.
    Stay,
    /// `stop` while waiting for an incoming migration: the guest stays
    /// paused once it has arrived (as QEMU).
    PauseAfterIncoming,
}

/// Why a QMP command is refused in this state (the text is QEMU's where
/// QEMU has one).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `cont` after a postcopy failure.
    #[error(
        "The guest's memory is incomplete after a failed postcopy migration; it cannot run here"
    )]
    MemoryIncomplete,
    /// `cont` in COLO.
    #[error("The guest is in COLO; use x-colo-lost-heartbeat to leave COLO")]
    Colo,
    /// `cont` while waiting for an incoming migration.
    #[error("Guest is waiting for an incoming migration")]
    InMigrate,
    /// `cont` during the final round.
    #[error("Migration is not finalized yet")]
    FinishMigrate,
    /// `cont` after shutdown or an internal error.
    #[error("Resetting the Virtual Machine is required (state {})", .0.as_str())]
    NeedsReset(RunState),
}

/// The run-state machine: what `input` does in `state`.
pub fn step(state: RunState, input: Input) -> Result<Step, Refused> {
    use RunState as S;
    Ok(match input {
        Input::Stop { .. } if state == S::InMigrate => Step::PauseAfterIncoming,
        Input::Stop {
            vcpus_running: true,
        } => Step::To(S::Paused, Vcpus::Pause),
        Input::Stop { .. } if state == S::Prelaunch => Step::To(S::Paused, Vcpus::Keep),
        Input::Stop { .. } => Step::Stay,
        Input::Cont {
            memory_incomplete: true,
            ..
        } => return Err(Refused::MemoryIncomplete),
        Input::Cont { colo: true, .. } => return Err(Refused::Colo),
        Input::Cont { .. } => match state {
            S::InMigrate => return Err(Refused::InMigrate),
            S::FinishMigrate => return Err(Refused::FinishMigrate),
            S::InternalError | S::Shutdown => return Err(Refused::NeedsReset(state)),
            S::Running => Step::Stay,
            _ => Step::To(S::Running, Vcpus::Resume),
        },
        Input::MigrationStopped { colo_primary: true } => Step::To(S::Colo, Vcpus::Pause),
        Input::MigrationStopped { .. } => Step::To(S::FinishMigrate, Vcpus::Pause),
        Input::MigrationResume { run: true }
        | Input::IncomingLoaded { run: true }
        | Input::ColoTakeover => Step::To(S::Running, Vcpus::Resume),
        Input::MigrationResume { .. } | Input::IncomingLoaded { .. } => {
            Step::To(S::Paused, Vcpus::Keep)
        }
        Input::ColoCheckpoint => Step::To(S::Colo, Vcpus::Keep),
        Input::ColoExit if state == S::Colo => Step::To(S::Paused, Vcpus::Keep),
        Input::ColoExit => Step::Stay,
        Input::PostcopyAbandoned {
            vcpus_running: true,
        } => Step::To(S::Paused, Vcpus::Pause),
        Input::PostcopyAbandoned { .. } => Step::To(S::Paused, Vcpus::Keep),
        Input::OutgoingEnded { source_done: true } => Step::To(S::PostMigrate, Vcpus::Keep),
        Input::OutgoingEnded { .. } => Step::Stay,
        Input::IncomingStarted => Step::To(S::InMigrate, Vcpus::Keep),
        Input::GuestShutdown => Step::To(S::Shutdown, Vcpus::Keep),
        Input::GuestFatal => Step::To(S::InternalError, Vcpus::Keep),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunState as S;

    const ALL: [RunState; 9] = [
        S::Prelaunch,
        S::Running,
        S::Paused,
        S::InMigrate,
        S::FinishMigrate,
        S::PostMigrate,
        S::Shutdown,
        S::InternalError,
        S::Colo,
    ];

    fn cont(state: RunState) -> Result<Step, Refused> {
        step(
            state,
            Input::Cont {
                memory_incomplete: false,
                colo: false,
            },
        )
    }

    #[test]
    fn names_are_qemus() {
        let names: Vec<&str> = ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "prelaunch",
                "running",
                "paused",
                "inmigrate",
                "finish-migrate",
                "postmigrate",
                "shutdown",
                "internal-error",
                "colo"
            ]
        );
        assert_eq!(RunState::initial(true), S::Prelaunch);
        assert_eq!(RunState::initial(false), S::Running);
    }

    #[test]
    fn stop_pauses_running_vcpus_and_defers_during_inmigrate() {
        let running = Input::Stop {
            vcpus_running: true,
        };
        let idle = Input::Stop {
            vcpus_running: false,
        };
        assert_eq!(
            step(S::Running, running),
            Ok(Step::To(S::Paused, Vcpus::Pause))
        );
        assert_eq!(step(S::InMigrate, idle), Ok(Step::PauseAfterIncoming));
        assert_eq!(
            step(S::Prelaunch, idle),
            Ok(Step::To(S::Paused, Vcpus::Keep))
        );
        for s in [S::Paused, S::PostMigrate, S::Shutdown, S::Colo] {
            assert_eq!(step(s, idle), Ok(Step::Stay), "{s:?}");
        }
    }

    #[test]
    fn cont_runs_from_stopped_states_and_refuses_the_others() {
        for s in [S::Prelaunch, S::Paused, S::PostMigrate, S::Colo] {
            assert_eq!(cont(s), Ok(Step::To(S::Running, Vcpus::Resume)), "{s:?}");
        }
        assert_eq!(cont(S::Running), Ok(Step::Stay));
        assert_eq!(cont(S::InMigrate), Err(Refused::InMigrate));
        assert_eq!(cont(S::FinishMigrate), Err(Refused::FinishMigrate));
        assert_eq!(cont(S::Shutdown), Err(Refused::NeedsReset(S::Shutdown)));
        let e = cont(S::InternalError).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Resetting the Virtual Machine is required (state internal-error)"
        );
    }

    #[test]
    fn cont_refused_after_failed_postcopy_and_in_colo_whatever_the_state() {
        for s in ALL {
            let incomplete = Input::Cont {
                memory_incomplete: true,
                colo: true,
            };
            assert_eq!(step(s, incomplete), Err(Refused::MemoryIncomplete));
            let colo = Input::Cont {
                memory_incomplete: false,
                colo: true,
            };
            assert_eq!(step(s, colo), Err(Refused::Colo));
        }
    }

    #[test]
    fn migration_source_states() {
        assert_eq!(
            step(
                S::Running,
                Input::MigrationStopped {
                    colo_primary: false
                }
            ),
            Ok(Step::To(S::FinishMigrate, Vcpus::Pause))
        );
        assert_eq!(
            step(S::Running, Input::MigrationStopped { colo_primary: true }),
            Ok(Step::To(S::Colo, Vcpus::Pause))
        );
        assert_eq!(
            step(S::FinishMigrate, Input::MigrationResume { run: true }),
            Ok(Step::To(S::Running, Vcpus::Resume))
        );
        assert_eq!(
            step(S::FinishMigrate, Input::MigrationResume { run: false }),
            Ok(Step::To(S::Paused, Vcpus::Keep))
        );
        assert_eq!(
            step(S::FinishMigrate, Input::OutgoingEnded { source_done: true }),
            Ok(Step::To(S::PostMigrate, Vcpus::Keep))
        );
        assert_eq!(
            step(S::Running, Input::OutgoingEnded { source_done: false }),
            Ok(Step::Stay)
        );
    }

    #[test]
    fn migration_destination_and_colo_states() {
        assert_eq!(
            step(S::Running, Input::IncomingStarted),
            Ok(Step::To(S::InMigrate, Vcpus::Keep))
        );
        assert_eq!(
            step(S::InMigrate, Input::IncomingLoaded { run: true }),
            Ok(Step::To(S::Running, Vcpus::Resume))
        );
        assert_eq!(
            step(S::InMigrate, Input::IncomingLoaded { run: false }),
            Ok(Step::To(S::Paused, Vcpus::Keep))
        );
        assert_eq!(
            step(S::InMigrate, Input::ColoCheckpoint),
            Ok(Step::To(S::Colo, Vcpus::Keep))
        );
        assert_eq!(
            step(S::Colo, Input::ColoTakeover),
            Ok(Step::To(S::Running, Vcpus::Resume))
        );
        assert_eq!(
            step(S::Colo, Input::ColoExit),
            Ok(Step::To(S::Paused, Vcpus::Keep))
        );
        assert_eq!(step(S::Running, Input::ColoExit), Ok(Step::Stay));
        assert_eq!(
            step(
                S::Running,
                Input::PostcopyAbandoned {
                    vcpus_running: true
                }
            ),
            Ok(Step::To(S::Paused, Vcpus::Pause))
        );
        assert_eq!(
            step(
                S::Paused,
                Input::PostcopyAbandoned {
                    vcpus_running: false
                }
            ),
            Ok(Step::To(S::Paused, Vcpus::Keep))
        );
    }

    #[test]
    fn guest_endings() {
        for s in ALL {
            assert_eq!(
                step(s, Input::GuestShutdown),
                Ok(Step::To(S::Shutdown, Vcpus::Keep))
            );
            assert_eq!(
                step(s, Input::GuestFatal),
                Ok(Step::To(S::InternalError, Vcpus::Keep))
            );
        }
    }
}
