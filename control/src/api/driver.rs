//! The seam between the API and the machines: what happens to instances and
//! attachments once a change is committed.
//!
//! The API commits a transitional state (`pending`, `stopping`,
//! `shutting-down`, attachment `attaching`/`detaching`) and answers. A
//! [`Job`] then goes to the [`InstanceDriver`] on a worker thread; when the
//! driver returns, the API commits the final state (`running`, `stopped`,
//! `terminated`, `attached`, `detached`) or, on failure, a state that says
//! so. Jobs of one instance run in order on one worker.
//!
//! [`RecordingDriver`] only records: every operation succeeds at once. The
//! QEMU driver (hot-plug over QMP, the switch snapshot from
//! [`InstanceDriver::on_change`]) plugs in here.

use crate::store::model::{Eni, Instance};
use crate::store::State;

/// What a driver could not do.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A reason the API shows as the instance's state reason.
    #[error("{0}")]
    Failed(String),
}

/// What a failure detector knows of an instance's guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// QEMU runs and the agent's heartbeat is fresh.
    Healthy,
    /// Nothing to judge by yet (booting, no heartbeat so far).
    Unknown,
    /// QEMU exited, or the heartbeat stopped: the reason.
    Failed(String),
}

/// The second look at a holder that [`InstanceDriver::health`] judged
/// failed (see [`InstanceDriver::confirm_failure`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    /// Act: the reason.
    Failed(String),
    /// Not yet: why the evidence is not enough (a busy host, not a hang).
    Suspect(String),
}

/// Work to do after a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Boot a new instance (its ENIs are on the command line).
    Launch(String),
    /// Boot a stopped instance.
    Start(String),
    Stop(String),
    Terminate(String),
    /// Attach `eni` to `instance` (hot when running).
    Attach {
        eni: String,
        instance: String,
    },
    /// Detach `eni` from `instance` (hot-unplug when running).
    Detach {
        eni: String,
        instance: String,
        force: bool,
    },
    /// Finish a NAT gateway's transition: pending → available,
    /// deleting → deleted.
    NatGateway(String),
    /// A load balancer: provisioning → active.
    LoadBalancer(String),
    /// The deregistration delay of a target is over: remove it if it is
    /// still draining since `since` (queued with that delay).
    Drain {
        target_group: String,
        target: String,
        port: u16,
        since: u64,
    },
}

impl Job {
    /// The instance the job is about: jobs of one instance run in order.
    pub fn instance(&self) -> &str {
        match self {
            Job::Launch(i) | Job::Start(i) | Job::Stop(i) | Job::Terminate(i) => i,
            Job::Attach { instance, .. } | Job::Detach { instance, .. } => instance,
            Job::NatGateway(id) | Job::LoadBalancer(id) => id,
            Job::Drain { target_group, .. } => target_group,
        }
    }
}

/// One target's health as the datapath's checks see it: (target id as
/// registered, port, ELBv2 state such as `healthy`, ELBv2 reason code such
/// as `Target.FailedHealthChecks`).
pub type TargetHealthRow = (String, u16, String, Option<String>);

/// Runs instances. Every method is called on a worker thread, never with
/// the store locked, and may block.
pub trait InstanceDriver: Send + Sync + 'static {
    /// Called once when the API has opened its store, before anything else
    /// (a driver that serves reads of the state keeps a weak reference).
    fn on_open(&self, _store: &std::sync::Arc<crate::store::Store>) {}

    /// Called after every committed change (with the store locked: be quick,
    /// e.g. build and swap a switch snapshot).
    fn on_change(&self, _state: &State) {}

    /// Boot `inst` with `enis` (the attachments, device order).
    fn launch(&self, _inst: &Instance, _enis: &[Eni]) -> Result<(), DriverError> {
        Ok(())
    }

    /// Boot a stopped instance again.
    fn start(&self, inst: &Instance, enis: &[Eni]) -> Result<(), DriverError> {
        self.launch(inst, enis)
    }

    fn stop(&self, _inst: &Instance) -> Result<(), DriverError> {
        Ok(())
    }

    fn terminate(&self, _inst: &Instance) -> Result<(), DriverError> {
        Ok(())
    }

    /// Attach `eni` (its `attachment` says where) to `inst`, which may be
    /// running (hot-plug), stopped (takes effect at the next start) or
    /// pending.
    fn attach(&self, _inst: &Instance, _eni: &Eni) -> Result<(), DriverError> {
        Ok(())
    }

    /// Detach `eni` from `inst`; `force` does not wait for the guest.
    fn detach(&self, _inst: &Instance, _eni: &Eni, _force: bool) -> Result<(), DriverError> {
        Ok(())
    }

    /// The hyperplane's nodes: whether each one's thread runs, and its
    /// counters. None: this driver runs no hyperplane.
    fn hyperplane_nodes(&self) -> Option<Vec<(bool, enilab_hyperplane::NodeStats)>> {
        None
    }

    /// Stop (`up` false) or start hyperplane node `node`: a failure drill.
    fn set_hyperplane_node(&self, _node: usize, _up: bool) -> Result<(), DriverError> {
        Err(DriverError::Failed(
            "this driver runs no hyperplane".to_string(),
        ))
    }

    /// Health of the targets of `target_group` (the ID, as stored) as the
    /// datapath's health checks see them, with ELBv2's state and reason names (`healthy`, `unhealthy` /
    /// `Target.FailedHealthChecks`, ...). None: the driver has no health
    /// checks (DescribeTargetHealth then reports registration states).
    fn target_health(&self, _target_group: &str) -> Option<Vec<TargetHealthRow>> {
        None
    }

    /// Start copying what `eni` sends and receives into a ring of
    /// `capacity` frames (`enilab capture`); the copy stops when the
    /// returned capture is dropped.
    fn capture(&self, _eni: &str, _capacity: usize) -> Result<enilab_switch::Capture, DriverError> {
        Err(DriverError::Failed(
            "this daemon runs no datapath (--driver record): nothing to capture".to_string(),
        ))
    }

    /// Every (instance, network card) aggregate with its allowances and
    /// `*_allowance_exceeded` counters (`CardStats` as JSON), for status
    /// and metrics.
    fn card_allowances(&self) -> serde_json::Value {
        serde_json::Value::Array(Vec::new())
    }

    /// What the driver runs, for `enilab status` (JSON; `null`: nothing).
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Is the instance's guest running now? The recording driver says yes.
    fn is_running(&self, _inst: &Instance) -> bool {
        true
    }

    /// Is the guest alive? (failover detection; the recording driver
    /// always says yes).
    fn health(&self, _inst: &Instance) -> Health {
        Health::Healthy
    }

    /// Confirm a failure [`InstanceDriver::health`] reported (`why`)
    /// before the ENI is moved: a late heartbeat may only mean a loaded
    /// host. Called with nothing locked; may ask QEMU (bounded, ~1 s).
    fn confirm_failure(&self, _inst: &Instance, why: &str) -> Confirm {
        Confirm::Failed(why.to_string())
    }

    /// Ask the guest of `inst` to reconcile its ENIs with instance
    /// metadata now (after an attach or an address move). Never blocks.
    fn refresh_guest(&self, _inst: &str) {}

    /// Restart the datapath's worker group of one card (or every card)
    /// under running guests; a JSON report of what was restarted.
    fn restart_backend(&self, _card: Option<u32>) -> Result<serde_json::Value, DriverError> {
        Err(DriverError::Failed(
            "this driver has no datapath to restart".to_string(),
        ))
    }

    /// Pause (QMP `stop`) or resume (`cont`) a guest: how tests make a
    /// guest hang.
    fn pause(&self, _inst: &str, _paused: bool) -> Result<(), DriverError> {
        Err(DriverError::Failed(
            "this driver runs no guests".to_string(),
        ))
    }

    /// Called once at start-up for each instance the state says is running,
    /// with its interfaces: find its guest again (a daemon restarted under
    /// it) and serve its devices. False: it is gone, record it as stopped.
    fn adopt(&self, inst: &Instance, _enis: &[Eni]) -> bool {
        self.is_running(inst)
    }
}

/// Records state only: no machines.
#[derive(Debug, Default)]
pub struct RecordingDriver;

impl InstanceDriver for RecordingDriver {}

/// Adapts a driver to the store's observer hook.
pub(super) struct DriverObserver(pub std::sync::Arc<dyn InstanceDriver>);

impl crate::store::Observer for DriverObserver {
    fn on_change(&self, state: &State) {
        self.0.on_change(state)
    }
}
