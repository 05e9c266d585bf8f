//! Core pinning: the relay and the load generator on separate CPUs, so a latency
//! figure is not the two fighting over one core (issue #20).
//!
//! `--pin relay=0,load=1` (lists: `relay=0-1,load=2,3`). The load generator pins
//! itself with `sched_setaffinity` before its runtime starts, so every thread it makes
//! inherits the set; the relay is started under `taskset -c`, so its threads inherit it
//! from the first instruction. Both are read back (`Cpus_allowed_list` in /proc) and a
//! run whose pinning did not take fails.

use std::collections::BTreeSet;

use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

use super::LoadError;

/// Which CPUs the relay and the load generator may run on; `None`: not pinned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pinning {
    /// The relay process (every node a run starts).
    pub relay: Option<Vec<usize>>,
    /// This process.
    pub load: Option<Vec<usize>>,
}

impl Pinning {
    /// Parses `relay=<cpus>,load=<cpus>`, either part optional, where `<cpus>` is a
    /// comma-separated list of CPUs and ranges (`0`, `0-1`, `0,2`).
    pub fn parse(s: &str) -> Result<Pinning, LoadError> {
        let mut pinning = Pinning::default();
        let mut role = "";
        for part in s.split(',').map(str::trim) {
            let item = match part.split_once('=') {
                Some((r, item)) => {
                    role = r.trim();
                    let slot = match role {
                        "relay" => &mut pinning.relay,
                        "load" => &mut pinning.load,
                        other => {
                            return Err(format!(
                                "--pin: unknown part {other:?} (relay=<cpus>,load=<cpus>)"
                            )
                            .into())
                        }
                    };
                    if slot.replace(Vec::new()).is_some() {
                        return Err(format!("--pin: {role} given twice").into());
                    }
                    item.trim()
                }
                None if role.is_empty() => {
                    return Err(format!("--pin: {part:?} before relay= or load=").into())
                }
                None => part,
            };
            let slot = if role == "relay" {
                &mut pinning.relay
            } else {
                &mut pinning.load
            };
            slot.get_or_insert_with(Vec::new).extend(cpu_item(item)?);
        }
        for list in [&mut pinning.relay, &mut pinning.load]
            .into_iter()
            .flatten()
        {
            let set: BTreeSet<usize> = list.iter().copied().collect();
            *list = set.into_iter().collect();
        }
        Ok(pinning)
    }

    /// Whether anything is pinned.
    pub fn any(&self) -> bool {
        self.relay.is_some() || self.load.is_some()
    }

    /// The relay's CPU list as `taskset -c` takes it.
    pub fn relay_list(&self) -> Option<String> {
        self.relay.as_deref().map(cpu_list)
    }

    /// How the run was pinned, for its report: `relay=0 load=1`, `relay=0 load=any`,
    /// or `none`.
    pub fn describe(&self) -> String {
        if !self.any() {
            return "none".into();
        }
        let part = |cpus: &Option<Vec<usize>>| cpus.as_deref().map_or("any".into(), cpu_list);
        format!("relay={} load={}", part(&self.relay), part(&self.load))
    }
}

/// One item of a CPU list: `3` or `0-2`.
fn cpu_item(item: &str) -> Result<Vec<usize>, LoadError> {
    let bad = || -> LoadError { format!("--pin: {item:?} is not a CPU or a range a-b").into() };
    let (a, b) = match item.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (item, item),
    };
    let a: usize = a.parse().map_err(|_| bad())?;
    let b: usize = b.parse().map_err(|_| bad())?;
    if a > b || b >= CpuSet::MAX_CPU {
        return Err(bad());
    }
    Ok((a..=b).collect())
}

/// `[0, 1, 2, 5]` as `0-2,5`, the form of /proc's `Cpus_allowed_list`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Pins the calling thread to `cpus` and checks it took; threads it starts afterwards
/// inherit the set, so call it before any runtime starts.
pub fn pin_this_thread(cpus: &[usize]) -> Result<(), LoadError> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu);
    }
    sched_setaffinity(None, &set).map_err(|e| format!("pinning to {}: {e}", cpu_list(cpus)))?;
    let now = sched_getaffinity(None)?;
    let got: Vec<usize> = (0..CpuSet::MAX_CPU).filter(|&c| now.is_set(c)).collect();
    if got != cpus {
        return Err(format!(
            "pinned to {} but allowed {} (CPUs offline?)",
            cpu_list(cpus),
            cpu_list(&got)
        )
        .into());
    }
    Ok(())
}

/// The CPUs process `pid` may run on, as /proc lists them (`0-1`).
pub fn cpus_allowed(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))?;
    Some(line.split_whitespace().nth(1)?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_roles_lists_and_ranges() {
        let p = Pinning::parse("relay=0,load=1").unwrap();
        assert_eq!((p.relay, p.load), (Some(vec![0]), Some(vec![1])));
        let p = Pinning::parse("relay=0-2,5,load=3").unwrap();
        assert_eq!(p.relay, Some(vec![0, 1, 2, 5]));
        assert_eq!(p.relay_list().as_deref(), Some("0-2,5"));
        let p = Pinning::parse("load=1").unwrap();
        assert_eq!((&p.relay, p.describe()), (&None, "relay=any load=1".into()));
        assert_eq!(Pinning::default().describe(), "none");
    }

    #[test]
    fn refuses_what_is_not_a_pinning() {
        for bad in [
            "",
            "0",
            "relay=",
            "relay=a",
            "relay=2-1",
            "cpu=1",
            "relay=0,relay=1",
        ] {
            assert!(Pinning::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lists_cpus_as_proc_does() {
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(cpu_list(&[]), "");
    }
}
