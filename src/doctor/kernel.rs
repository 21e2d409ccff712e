//! The kernel: the modules veilnet needs (present: loaded, built in, or loadable) and the offloads
//! the datapath will get (UDP GSO/GRO on its sockets, `TUNSETOFFLOAD` on its TUN).
//!
//! Modules are never loaded here. A module is *loaded* when `/sys/module/NAME` exists or
//! `/proc/modules` lists it, *built in* when `modules.builtin` lists it or the running kernel's
//! config (`/proc/config.gz`) says `=y`, *loadable* when `modules.dep` lists it. br_netfilter is
//! only a warning when missing: veilnet routes and encrypts without it, but bridged same-node
//! pod↔pod frames then skip the inet forward hook, so NetworkPolicy between pods of one node is
//! not enforced (see `policy::enable_bridge_netfilter`).

use std::path::Path;

use super::{Check, Context};

/// A module veilnet uses, its kernel config symbol, and what it is for.
pub struct Module {
    pub name: &'static str,
    pub config: &'static str,
    pub purpose: &'static str,
    /// Missing is a FAIL (else a WARN).
    pub required: bool,
}

pub const MODULES: [Module; 4] = [
    Module {
        name: "vxlan",
        config: "CONFIG_VXLAN",
        purpose: "the VXLAN overlay device",
        required: true,
    },
    Module {
        name: "tun",
        config: "CONFIG_TUN",
        purpose: "the WireGuard datapath's TUN device",
        required: true,
    },
    Module {
        name: "nf_tables",
        config: "CONFIG_NF_TABLES",
        purpose: "NetworkPolicy and the wire table",
        required: true,
    },
    Module {
        name: "br_netfilter",
        config: "CONFIG_BRIDGE_NETFILTER",
        purpose: "NetworkPolicy between pods of the same node (bridged frames through the inet forward hook)",
        required: false,
    },
];

/// Where one module was found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleFacts {
    pub name: String,
    /// Loaded: the evidence (`/sys/module/vxlan`, `/proc/modules`).
    pub loaded: Option<String>,
    /// Built in: the evidence (`modules.builtin`, `/proc/config.gz: CONFIG_TUN=y`).
    pub builtin: Option<String>,
    /// Loadable: the module file `modules.dep` names.
    pub loadable: Option<String>,
}

/// The TUN offload probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunProbe {
    /// A throwaway TUN in the node's namespace accepted these `TUN_F_*` bits.
    Accepted(u32),
    /// Not probed, and why.
    Skipped(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffloadFacts {
    /// `uname -r`.
    pub release: String,
    /// `setsockopt(UDP_SEGMENT)` on a throwaway UDP socket: `Err(errno text)` when refused.
    pub udp_gso: Result<(), String>,
    /// `setsockopt(UDP_GRO)`.
    pub udp_gro: Result<(), String>,
    pub tun: TunProbe,
    /// What the running datapath reported it got (the agent's status), if known.
    pub datapath: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFacts {
    pub modules: Vec<ModuleFacts>,
    pub offloads: OffloadFacts,
}

pub fn gather(ctx: &Context, datapath_offloads: Option<String>) -> KernelFacts {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let lib = Path::new("/lib/modules").join(&release);
    let proc_modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let builtin = std::fs::read_to_string(lib.join("modules.builtin")).unwrap_or_default();
    let dep = std::fs::read_to_string(lib.join("modules.dep")).unwrap_or_default();
    let config = kernel_config();
    let modules = MODULES
        .iter()
        .map(|m| module_facts(m, &proc_modules, &builtin, &dep, &config))
        .collect();
    let probe = || {
        let (gso, gro) = probe_udp();
        (gso, gro, probe_tun())
    };
    let (udp_gso, udp_gro, tun) = match &ctx.netns {
        Some(ns) => match crate::netns::run_in(ns, probe) {
            Ok(found) => found,
            Err(e) => {
                let err = format!("cannot enter {ns}: {e}");
                (Err(err.clone()), Err(err.clone()), TunProbe::Skipped(err))
            }
        },
        None => {
            let (gso, gro) = probe_udp();
            (
                gso,
                gro,
                TunProbe::Skipped(
                    "not probed on a node (it would create a device in the host namespace)".into(),
                ),
            )
        }
    };
    KernelFacts {
        modules,
        offloads: OffloadFacts {
            release,
            udp_gso,
            udp_gro,
            tun,
            datapath: datapath_offloads,
        },
    }
}

/// The running kernel's config, decompressed by `gzip -dc` (empty when unavailable).
fn kernel_config() -> String {
    std::process::Command::new("gzip")
        .args(["-dc", "/proc/config.gz"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Where `m` is, from the texts of `/proc/modules`, `modules.builtin`, `modules.dep` and the
/// kernel config (pure but for the `/sys/module` look-up).
fn module_facts(
    m: &Module,
    proc_modules: &str,
    builtin: &str,
    dep: &str,
    config: &str,
) -> ModuleFacts {
    let sys = format!("/sys/module/{}", m.name);
    let mut f = parse_module(m, proc_modules, builtin, dep, config);
    if f.loaded.is_none() && f.builtin.is_none() && Path::new(&sys).exists() {
        f.loaded = Some(sys);
    }
    f
}

/// The pure part of [`module_facts`].
pub fn parse_module(
    m: &Module,
    proc_modules: &str,
    builtin: &str,
    dep: &str,
    config: &str,
) -> ModuleFacts {
    // modules.builtin and modules.dep name files (kernel/net/bridge/br_netfilter.ko[.zst]), and
    // a module's file uses '-' or '_' interchangeably.
    let file_is = |path: &str| {
        let base = path.rsplit('/').next().unwrap_or(path);
        let stem = base.split(".ko").next().unwrap_or(base);
        stem.replace('-', "_") == m.name
    };
    let loaded = proc_modules
        .lines()
        .any(|l| l.split_whitespace().next() == Some(m.name))
        .then(|| "/proc/modules".to_string());
    let config_value = config
        .lines()
        .find_map(|l| l.strip_prefix(m.config)?.strip_prefix('='));
    let builtin = if builtin.lines().any(|l| file_is(l.trim())) {
        Some("modules.builtin".to_string())
    } else if config_value == Some("y") {
        Some(format!("/proc/config.gz: {}=y", m.config))
    } else {
        None
    };
    let loadable = dep.lines().find_map(|l| {
        let (file, _) = l.split_once(':')?;
        file_is(file).then(|| file.to_string())
    });
    ModuleFacts {
        name: m.name.to_string(),
        loaded,
        builtin,
        loadable,
    }
}

fn errno_text() -> String {
    std::io::Error::last_os_error().to_string()
}

/// `setsockopt` of UDP_SEGMENT and UDP_GRO on an unbound UDP socket, closed right after.
fn probe_udp() -> (Result<(), String>, Result<(), String>) {
    // SAFETY: a plain socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = format!("socket: {}", errno_text());
        return (Err(e.clone()), Err(e));
    }
    let set = |opt: libc::c_int, value: libc::c_int| -> Result<(), String> {
        // SAFETY: fd is a valid socket, and value outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_UDP,
                opt,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(errno_text())
        }
    };
    let gso = set(libc::UDP_SEGMENT, 1400);
    let gro = set(libc::UDP_GRO, 1);
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    (gso, gro)
}

/// Opens a throwaway, non-persistent TUN in this thread's namespace as the datapath does (it goes
/// away when closed) and reports the offloads the kernel accepted.
fn probe_tun() -> TunProbe {
    let name = format!("veildoc{}", std::process::id() % 100_000);
    match crate::wg::tun::Tun::open(&name, 1500, false) {
        Ok(tun) => TunProbe::Accepted(tun.offloads),
        Err(e) => TunProbe::Skipped(format!("probe TUN {name}: {e}")),
    }
}

/// Names of the `TUN_F_*` bits.
pub fn tun_offload_names(bits: u32) -> Vec<&'static str> {
    [
        (libc::TUN_F_CSUM, "csum"),
        (libc::TUN_F_TSO4, "tso4"),
        (libc::TUN_F_TSO6, "tso6"),
        (libc::TUN_F_TSO_ECN, "tso_ecn"),
        (libc::TUN_F_USO4, "uso4"),
        (libc::TUN_F_USO6, "uso6"),
    ]
    .into_iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|(_, n)| n)
    .collect()
}

/// `(major, minor)` of a release such as `6.1.0-18-amd64`.
fn version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

pub fn check(facts: &KernelFacts) -> Vec<Check> {
    let mut checks: Vec<Check> = MODULES
        .iter()
        .map(|m| {
            let f = facts.modules.iter().find(|f| f.name == m.name);
            check_module(m, f)
        })
        .collect();
    checks.push(check_offloads(&facts.offloads));
    checks
}

fn check_module(m: &Module, f: Option<&ModuleFacts>) -> Check {
    let name = format!("kernel.module.{}", m.name);
    let f = f.cloned().unwrap_or_default();
    if let Some(how) = &f.loaded {
        return Check::ok(&name, format!("{} loaded ({how})", m.name));
    }
    if let Some(how) = &f.builtin {
        return Check::ok(&name, format!("{} built in ({how})", m.name));
    }
    if let Some(file) = &f.loadable {
        return Check::ok(
            &name,
            format!(
                "{} not loaded, loadable ({file}); the agent's use loads it",
                m.name
            ),
        );
    }
    let evidence = format!(
        "{} is not loaded, not built in, and modules.dep does not list it: no {}",
        m.name, m.purpose
    );
    let fix = format!(
        "install the kernel's modules package for this kernel (uname -r), or a kernel with {}, then modprobe {}",
        m.config, m.name
    );
    if m.required {
        Check::fail(&name, evidence, fix)
    } else {
        Check::warn(&name, evidence, fix)
    }
}

fn check_offloads(o: &OffloadFacts) -> Check {
    const NAME: &str = "kernel.offloads";
    let yes_no = |r: &Result<(), String>| match r {
        Ok(()) => "yes".to_string(),
        Err(e) => format!("no ({e})"),
    };
    let mut missing = Vec::new();
    if o.udp_gso.is_err() {
        missing.push("UDP GSO (needs 4.18)");
    }
    if o.udp_gro.is_err() {
        missing.push("UDP GRO (needs 5.0)");
    }
    let tun = match &o.tun {
        TunProbe::Accepted(bits) => {
            if bits & libc::TUN_F_TSO4 == 0 {
                missing.push("TUN TSO");
            }
            let names = tun_offload_names(*bits);
            format!(
                "TUN {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(",")
                }
            )
        }
        TunProbe::Skipped(why) => format!("TUN not probed: {why}"),
    };
    let uso = match version(&o.release) {
        Some(v) if v >= (6, 2) => "; TUN USO allowed (6.2+)",
        Some(_) => "; TUN USO not before 6.2",
        None => "",
    };
    let datapath = o
        .datapath
        .as_deref()
        .map(|d| format!("; the datapath reports {d}"))
        .unwrap_or_default();
    let evidence = format!(
        "kernel {}: UDP GSO {}, UDP GRO {}, {tun}{uso}{datapath}",
        o.release,
        yes_no(&o.udp_gso),
        yes_no(&o.udp_gro)
    );
    if missing.is_empty() {
        Check::ok(NAME, evidence)
    } else {
        Check::warn(
            NAME,
            format!("{evidence}; missing: {}", missing.join(", ")),
            "encryption works, but with one syscall per packet and slower: run a newer kernel (5.0+ for UDP GRO, 6.2+ for TUN USO)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;

    fn module(name: &str) -> &'static Module {
        MODULES.iter().find(|m| m.name == name).unwrap()
    }

    fn good_offloads() -> OffloadFacts {
        OffloadFacts {
            release: "6.8.0-40-generic".into(),
            udp_gso: Ok(()),
            udp_gro: Ok(()),
            tun: TunProbe::Accepted(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6),
            datapath: Some("tun:csum,tso4,tso6 udp:gso,gro".into()),
        }
    }

    #[test]
    fn modules_are_found_loaded_builtin_or_loadable() {
        let proc_modules = "vxlan 135168 0 - Live 0x0\nip6_udp_tunnel 16384 1 vxlan, Live 0x0\n";
        let builtin = "kernel/drivers/net/tun.ko\n";
        let dep = "kernel/net/netfilter/nf_tables.ko.zst: kernel/net/netfilter/nfnetlink.ko.zst\n\
                   kernel/net/bridge/br_netfilter.ko.zst: kernel/net/bridge/bridge.ko.zst\n";
        let f = |n| parse_module(module(n), proc_modules, builtin, dep, "");
        assert_eq!(f("vxlan").loaded.as_deref(), Some("/proc/modules"));
        assert_eq!(f("tun").builtin.as_deref(), Some("modules.builtin"));
        assert_eq!(
            f("nf_tables").loadable.as_deref(),
            Some("kernel/net/netfilter/nf_tables.ko.zst")
        );
        assert!(f("br_netfilter").loadable.is_some());
        // From the running kernel's config alone.
        let c = parse_module(module("tun"), "", "", "", "CONFIG_TUN=y\nCONFIG_VXLAN=m\n");
        assert_eq!(c.builtin.as_deref(), Some("/proc/config.gz: CONFIG_TUN=y"));
        let facts = KernelFacts {
            modules: MODULES.iter().map(|m| f(m.name)).collect(),
            offloads: good_offloads(),
        };
        let checks = check(&facts);
        let names: Vec<_> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "kernel.module.vxlan",
                "kernel.module.tun",
                "kernel.module.nf_tables",
                "kernel.module.br_netfilter",
                "kernel.offloads"
            ]
        );
        assert!(
            checks.iter().all(|c| c.verdict == Verdict::Ok),
            "{checks:?}"
        );
        assert!(checks[2].evidence.contains("nf_tables.ko.zst"));
    }

    #[test]
    fn a_missing_required_module_fails_and_br_netfilter_only_warns() {
        // The unit test stands in for the lab here: modules cannot be unloaded in a test (global
        // kernel state).
        let facts = KernelFacts {
            modules: vec![],
            offloads: good_offloads(),
        };
        let checks = check(&facts);
        for c in &checks[..3] {
            assert_eq!(c.verdict, Verdict::Fail, "{c:?}");
            assert!(c.fix.as_ref().unwrap().contains("modprobe"), "{c:?}");
        }
        assert_eq!(checks[0].name, "kernel.module.vxlan");
        assert!(
            checks[0].evidence.contains("VXLAN overlay"),
            "{:?}",
            checks[0]
        );
        assert_eq!(checks[3].name, "kernel.module.br_netfilter");
        assert_eq!(checks[3].verdict, Verdict::Warn);
    }

    #[test]
    fn missing_offloads_warn_and_say_which() {
        let ok = check_offloads(&good_offloads());
        assert_eq!(ok.verdict, Verdict::Ok, "{ok:?}");
        assert!(
            ok.evidence.contains("TUN csum,tso4,tso6"),
            "{}",
            ok.evidence
        );
        assert!(ok.evidence.contains("TUN USO allowed"), "{}", ok.evidence);
        let old = OffloadFacts {
            release: "4.19.0".into(),
            udp_gro: Err("Protocol not available (os error 92)".into()),
            tun: TunProbe::Accepted(libc::TUN_F_CSUM),
            datapath: None,
            ..good_offloads()
        };
        let c = check_offloads(&old);
        assert_eq!(c.verdict, Verdict::Warn);
        assert!(
            c.evidence.contains("UDP GRO no (Protocol not available"),
            "{}",
            c.evidence
        );
        assert!(c.evidence.contains("missing: UDP GRO"), "{}", c.evidence);
        assert!(c.evidence.contains("TUN TSO"), "{}", c.evidence);
        assert!(c.evidence.contains("not before 6.2"), "{}", c.evidence);
        // A skipped TUN probe is said, and is not a finding by itself.
        let skipped = OffloadFacts {
            tun: TunProbe::Skipped("not probed on a node".into()),
            ..good_offloads()
        };
        let c = check_offloads(&skipped);
        assert_eq!(c.verdict, Verdict::Ok);
        assert!(c.evidence.contains("TUN not probed"), "{}", c.evidence);
    }
}
