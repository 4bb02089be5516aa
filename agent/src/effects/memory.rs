//! A node held in memory, for tests of everything above the effects.

use std::io;

use super::{
    Addr, EffectError, Effects, FileState, LinkState, NetChange, NetState, RouteState, UnitState,
    PROTO_KERNEL,
};

/// A node held in memory: for tests of everything above the effects, and for dry runs. It never
/// touches the machine it runs on. Unknown sysctls read as "0" (or as absent, with
/// `strict_sysctls`); every owner resolves to 0:0.
#[derive(Debug, Default)]
pub struct MemoryEffects {
    pub hostname: std::sync::Mutex<String>,
    pub files: std::sync::Mutex<std::collections::BTreeMap<String, FileState>>,
    pub sysctls: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    pub net: std::sync::Mutex<NetState>,
    pub modules: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub units: std::sync::Mutex<std::collections::BTreeMap<String, UnitState>>,
    /// `systemctl` calls, in order.
    pub systemctl_calls: std::sync::Mutex<Vec<String>>,
    /// Sysctls not set before read as absent, as on a kernel without them.
    pub strict_sysctls: bool,
}

fn locked<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Effects for MemoryEffects {
    fn hostname(&self) -> Result<String, EffectError> {
        Ok(locked(&self.hostname).clone())
    }
    fn set_hostname(&self, name: &str) -> Result<(), EffectError> {
        *locked(&self.hostname) = name.into();
        Ok(())
    }
    fn read_file(&self, path: &str) -> Result<Option<FileState>, EffectError> {
        Ok(locked(&self.files).get(path).cloned())
    }
    fn write_file(
        &self,
        path: &str,
        content: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), EffectError> {
        locked(&self.files).insert(path.into(), FileState { content: content.into(), mode, uid, gid });
        Ok(())
    }
    fn remove_file(&self, path: &str) -> Result<(), EffectError> {
        locked(&self.files).remove(path);
        Ok(())
    }
    fn exists(&self, path: &str) -> Result<bool, EffectError> {
        let dir = format!("{}/", path.trim_end_matches('/'));
        Ok(locked(&self.files).keys().any(|k| k == path || k.starts_with(&dir)))
    }
    fn remove_empty_dir(&self, _: &str) -> Result<(), EffectError> {
        // Directories exist here only as the prefixes of files.
        Ok(())
    }
    fn resolve_owner(&self, user: &str, group: Option<&str>) -> Result<(u32, u32), EffectError> {
        let id = |s: &str| s.parse().unwrap_or(0);
        Ok((id(user), group.map_or(id(user), id)))
    }
    fn sysctl(&self, key: &str) -> Result<Option<String>, EffectError> {
        let have = locked(&self.sysctls).get(key).cloned();
        Ok(if self.strict_sysctls { have } else { Some(have.unwrap_or_else(|| "0".into())) })
    }
    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), EffectError> {
        locked(&self.sysctls).insert(key.into(), value.into());
        Ok(())
    }
    fn network(&self) -> Result<NetState, EffectError> {
        Ok(locked(&self.net).clone())
    }
    fn change_network(&self, change: &NetChange) -> Result<(), EffectError> {
        let mut net = locked(&self.net);
        let missing = || EffectError {
            what: change.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such link"),
        };
        let idx = match change {
            NetChange::SetLink { index, .. }
            | NetChange::DelLink { index }
            | NetChange::AddAddress { index, .. }
            | NetChange::DelAddress { index, .. }
            | NetChange::AddRoute { index, .. }
            | NetChange::DelRoute { index, .. } => *index,
            NetChange::AddVlan { parent, name, .. } => {
                if !net.links.iter().any(|l| l.index == *parent) {
                    return Err(missing());
                }
                let index = net.links.iter().map(|l| l.index).max().unwrap_or(0) + 1;
                net.links.push(LinkState {
                    index,
                    name: name.clone(),
                    mtu: 1500,
                    up: true,
                    ..LinkState::default()
                });
                return Ok(());
            }
        };
        let link = net.links.iter_mut().find(|l| l.index == idx).ok_or_else(missing)?;
        match change {
            NetChange::SetLink { up, mtu, .. } => {
                link.up = *up;
                if let Some(m) = mtu {
                    link.mtu = *m;
                }
            }
            NetChange::DelLink { .. } => {
                net.links.retain(|l| l.index != idx);
            }
            // As the kernel does: an address brings its subnet's route, and takes it (and the
            // routes through a gateway in it) along when it goes.
            NetChange::AddAddress { addr, .. } => {
                link.addresses.push(*addr);
                let net = subnet(addr);
                if !link.routes.iter().any(|r| r.to == net) {
                    link.routes.push(RouteState { to: net, via: None, metric: None, protocol: PROTO_KERNEL });
                }
            }
            NetChange::DelAddress { addr, .. } => {
                link.addresses.retain(|a| a != addr);
                let net = subnet(addr);
                let inside = |ip: &std::net::IpAddr| subnet(&Addr { ip: *ip, prefix: addr.prefix }) == net;
                link.routes.retain(|r| r.to != net && !r.via.as_ref().is_some_and(inside));
            }
            NetChange::AddRoute { route, .. } => link.routes.push(route.clone()),
            NetChange::DelRoute { route, .. } => {
                link.routes.retain(|r| r.to != route.to || r.via != route.via)
            }
            NetChange::AddVlan { .. } => {}
        }
        Ok(())
    }
    fn kernel_owned(&self) -> Result<(), String> {
        Ok(())
    }
    fn module_loaded(&self, name: &str) -> Result<bool, EffectError> {
        Ok(locked(&self.modules).contains(name))
    }
    fn load_module(&self, name: &str, _: &[String]) -> Result<(), EffectError> {
        locked(&self.modules).insert(name.into());
        Ok(())
    }
    fn unload_module(&self, name: &str) -> Result<(), EffectError> {
        locked(&self.modules).remove(name);
        Ok(())
    }
    fn systemd(&self) -> Result<(), String> {
        Ok(())
    }
    fn unit_state(&self, name: &str) -> Result<UnitState, EffectError> {
        Ok(locked(&self.units).get(name).copied().unwrap_or_default())
    }
    fn systemctl(&self, verb: &str, unit: Option<&str>) -> Result<(), EffectError> {
        locked(&self.systemctl_calls).push(format!("{verb} {}", unit.unwrap_or("")).trim_end().to_owned());
        if let Some(u) = unit {
            let mut units = locked(&self.units);
            let st = units.entry(u.into()).or_default();
            match verb {
                "enable" => st.enabled = true,
                "disable" => st.enabled = false,
                "start" | "restart" => st.active = true,
                "stop" => st.active = false,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The network of an address (host bits cleared).
fn subnet(a: &Addr) -> Addr {
    let ip = match a.ip {
        std::net::IpAddr::V4(v) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(a.prefix)).unwrap_or(0);
            std::net::IpAddr::V4((u32::from(v) & mask).into())
        }
        std::net::IpAddr::V6(v) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(a.prefix)).unwrap_or(0);
            std::net::IpAddr::V6((u128::from(v) & mask).into())
        }
    };
    Addr { ip, prefix: a.prefix }
}
