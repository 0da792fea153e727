//! The kernel side: loads the eBPF object, attaches its programs to pod interfaces, writes and reads
//! its maps.
use std::collections::BTreeMap;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId},
};
use dataplane_common::{
    Backend, CtKey, CtValue, DropReason, ServiceKey, ServiceValue, SvcStats, map_names, prog_names,
};

use crate::{diff::Op, program::MapWriter};

/// The programs attached to one interface.
#[derive(Debug)]
struct Attachment {
    ifindex: u32,
    from_pod: SchedClassifierLinkId,
    to_pod: SchedClassifierLinkId,
}

/// The loaded eBPF object and handles to its maps.
pub struct Datapath {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    drops: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuArray<MapData, SvcStats>,
    attached: BTreeMap<String, Attachment>,
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    /// Loads the embedded object and verifies both programs.
    ///
    /// # Errors
    /// The kernel refused a map or a program (the verifier log is in the error chain).
    pub fn load() -> anyhow::Result<Self> {
        Self::load_object(crate::ebpf::OBJECT)
    }

    /// Loads a given eBPF object.
    ///
    /// # Errors
    /// As [`Datapath::load`].
    pub fn load_object(object: &[u8]) -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(object).context("loading the eBPF object")?;
        for name in [prog_names::FROM_POD, prog_names::TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier refused program {name}"))?;
        }
        Ok(Self {
            services: take_map(&mut ebpf, map_names::SERVICES)?,
            backends: take_map(&mut ebpf, map_names::BACKENDS)?,
            conntrack: take_map(&mut ebpf, map_names::CONNTRACK)?,
            drops: take_map(&mut ebpf, map_names::DROPS)?,
            svc_stats: take_map(&mut ebpf, map_names::SVC_STATS)?,
            ebpf,
            attached: BTreeMap::new(),
        })
    }

    /// A loaded program, for `BPF_PROG_TEST_RUN`.
    ///
    /// # Errors
    /// No program of that name.
    pub fn program(&self, name: &str) -> anyhow::Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Attaches both programs to a pod's host-side interface (TCX ingress and egress). An interface
    /// that was re-created under the same name is re-attached.
    ///
    /// # Errors
    /// The interface does not exist or the kernel refused the link.
    pub fn attach(&mut self, iface: &str, ifindex: u32) -> anyhow::Result<bool> {
        if let Some(a) = self.attached.get(iface) {
            if a.ifindex == ifindex {
                return Ok(false);
            }
            self.detach(iface);
        }
        let from_pod = self.classifier(prog_names::FROM_POD)?;
        let from_pod = from_pod
            .attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching {} to {iface}", prog_names::FROM_POD))?;
        let to_pod = self.classifier(prog_names::TO_POD)?;
        let to_pod = match to_pod.attach(iface, TcAttachType::Egress) {
            Ok(link) => link,
            Err(e) => {
                let prog = self.classifier(prog_names::FROM_POD)?;
                // Best effort: the interface may be gone already.
                let _ = prog.detach(from_pod);
                return Err(e)
                    .with_context(|| format!("attaching {} to {iface}", prog_names::TO_POD));
            }
        };
        self.attached.insert(
            iface.to_owned(),
            Attachment {
                ifindex,
                from_pod,
                to_pod,
            },
        );
        Ok(true)
    }

    /// Detaches from an interface. Links to an interface that vanished are already gone; errors
    /// are ignored for that reason.
    pub fn detach(&mut self, iface: &str) {
        let Some(a) = self.attached.remove(iface) else {
            return;
        };
        if let Ok(p) = self.classifier(prog_names::FROM_POD) {
            let _ = p.detach(a.from_pod);
        }
        if let Ok(p) = self.classifier(prog_names::TO_POD) {
            let _ = p.detach(a.to_pod);
        }
    }

    /// Interfaces the programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    fn classifier(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Packets dropped by reason, summed over CPUs.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn drops(&self) -> anyhow::Result<Vec<(DropReason, u64)>> {
        DropReason::ALL
            .iter()
            .map(|r| {
                let per_cpu = self.drops.get(&(*r as u32), 0)?;
                Ok((*r, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Packets and bytes sent towards one service port, summed over CPUs.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn service_stats(&self, rev_nat_id: u16) -> anyhow::Result<SvcStats> {
        let per_cpu = self.svc_stats.get(&u32::from(rev_nat_id), 0)?;
        Ok(per_cpu.iter().fold(SvcStats::default(), |acc, s| SvcStats {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
        }))
    }

    /// Service map entries, as the kernel holds them.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn service_entries(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>> {
        Ok(self.services.iter().collect::<Result<_, _>>()?)
    }

    /// Backend map entries, as the kernel holds them.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn backend_entries(&self) -> anyhow::Result<Vec<(u32, Backend)>> {
        Ok(self.backends.iter().collect::<Result<_, _>>()?)
    }

    /// Conntrack entries, as the kernel holds them.
    ///
    /// # Errors
    /// The map could not be read.
    pub fn conntrack_entries(&self) -> anyhow::Result<Vec<(CtKey, CtValue)>> {
        Ok(self.conntrack.iter().collect::<Result<_, _>>()?)
    }

    /// Removes one conntrack entry (garbage collection).
    ///
    /// # Errors
    /// The entry could not be removed for another reason than being gone already.
    pub fn remove_conntrack(&mut self, key: &CtKey) -> anyhow::Result<()> {
        match self.conntrack.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl MapWriter for Datapath {
    fn write(&mut self, op: &Op) -> anyhow::Result<()> {
        match op {
            Op::UpsertBackend(id, b) => self.backends.insert(id, b, 0)?,
            Op::UpsertService(k, v) => self.services.insert(k, v, 0)?,
            Op::DeleteService(k) => match self.services.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            },
            Op::DeleteBackend(id) => match self.backends.remove(id) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }
}
