//! Which of the host's namespaces a container leaves for new ones of its own
//! (`--container-unshare=net,ipc,uts`, `ferry run --unshare`). The user and mount
//! namespaces are always the container's own; by default it shares the host's others.

use serde::{Deserialize, Serialize};

/// A namespace a container can have of its own besides its user and mount namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Namespace {
    /// Network: only a loopback interface, brought up.
    Net,
    /// System V IPC and POSIX message queues.
    Ipc,
    /// Host and domain name.
    Uts,
}

impl Namespace {
    pub const ALL: [Namespace; 3] = [Namespace::Net, Namespace::Ipc, Namespace::Uts];

    /// The name users write, which is also the kernel's under `/proc/PID/ns/`.
    pub fn name(self) -> &'static str {
        match self {
            Namespace::Net => "net",
            Namespace::Ipc => "ipc",
            Namespace::Uts => "uts",
        }
    }

    pub fn clone_flag(self) -> nix::sched::CloneFlags {
        use nix::sched::CloneFlags;
        match self {
            Namespace::Net => CloneFlags::CLONE_NEWNET,
            Namespace::Ipc => CloneFlags::CLONE_NEWIPC,
            Namespace::Uts => CloneFlags::CLONE_NEWUTS,
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of [`Namespace`]s; empty: share all of the host's (the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<Namespace>", into = "Vec<Namespace>")]
pub struct Unshare {
    bits: u8,
}

impl Unshare {
    pub fn contains(self, ns: Namespace) -> bool {
        self.bits & ns.bit() != 0
    }

    pub fn insert(&mut self, ns: Namespace) {
        self.bits |= ns.bit();
    }

    pub fn is_empty(self) -> bool {
        self.bits == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Namespace> {
        Namespace::ALL
            .into_iter()
            .filter(move |ns| self.contains(*ns))
    }

    /// The flags of `unshare(2)` for these namespaces.
    pub fn clone_flags(self) -> nix::sched::CloneFlags {
        self.iter()
            .fold(nix::sched::CloneFlags::empty(), |f, ns| f | ns.clone_flag())
    }
}

impl From<Vec<Namespace>> for Unshare {
    fn from(list: Vec<Namespace>) -> Unshare {
        let mut set = Unshare::default();
        for ns in list {
            set.insert(ns);
        }
        set
    }
}

impl From<Unshare> for Vec<Namespace> {
    fn from(set: Unshare) -> Vec<Namespace> {
        set.iter().collect()
    }
}

/// A name in an unshare list that is none of [`Namespace::ALL`]; callers put the option in
/// front.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown namespace \"{0}\" (known: net, ipc, uts)")]
pub struct UnknownNamespace(pub String);

impl std::str::FromStr for Unshare {
    type Err = UnknownNamespace;

    /// A comma-separated list (`net,ipc`); empty items are skipped, so `""` is the default.
    fn from_str(text: &str) -> Result<Unshare, UnknownNamespace> {
        let mut set = Unshare::default();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let ns = Namespace::ALL
                .into_iter()
                .find(|ns| ns.name() == name)
                .ok_or_else(|| UnknownNamespace(name.to_string()))?;
            set.insert(ns);
        }
        Ok(set)
    }
}

/// The list as it is parsed back (`net,uts`), in a fixed order.
impl std::fmt::Display for Unshare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.iter().map(Namespace::name).collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_print_and_travel_alike() {
        let set: Unshare = " uts,net ,net".parse().unwrap();
        assert!(set.contains(Namespace::Net) && set.contains(Namespace::Uts));
        assert!(!set.contains(Namespace::Ipc));
        assert_eq!(set.to_string(), "net,uts");
        assert_eq!(set.to_string().parse::<Unshare>(), Ok(set));
        let json = serde_json::to_string(&set).unwrap();
        assert_eq!(json, r#"["net","uts"]"#);
        assert_eq!(serde_json::from_str::<Unshare>(&json).unwrap(), set);
        let all: Unshare = "net,ipc,uts".parse().unwrap();
        use nix::sched::CloneFlags;
        assert_eq!(
            all.clone_flags(),
            CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS
        );
    }

    #[test]
    fn empty_is_the_default_and_unknown_names_are_refused() {
        assert_eq!("".parse::<Unshare>(), Ok(Unshare::default()));
        assert!("".parse::<Unshare>().unwrap().is_empty());
        assert_eq!(
            "net,pid".parse::<Unshare>().unwrap_err().to_string(),
            "unknown namespace \"pid\" (known: net, ipc, uts)"
        );
        assert!("NET".parse::<Unshare>().is_err());
    }
}
