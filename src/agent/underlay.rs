//! This node's underlay: the interface that carries the node's address, and its MTU.

use std::net::IpAddr;

use crate::kernel::{KernelError, OverlayKernel};

#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("no interface of this node carries the underlay address {ip}")]
    NotLocal { ip: IpAddr },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderlayDevice {
    pub ip: IpAddr,
    pub dev: String,
    pub mtu: u32,
}

/// Finds the interface holding `ip`. Looking the address up (rather than routing towards it) also
/// proves the configured or published address really is this node's.
pub async fn find<K: OverlayKernel>(
    kernel: &mut K,
    ip: IpAddr,
) -> Result<UnderlayDevice, UnderlayError> {
    let addrs = kernel.dump_addresses().await?;
    let Some(index) = addrs.iter().find(|a| a.addr.addr() == ip).map(|a| a.index) else {
        return Err(UnderlayError::NotLocal { ip });
    };
    let links = kernel.dump_links().await?;
    let link = links
        .into_iter()
        .find(|l| l.index == index)
        .ok_or(UnderlayError::NotLocal { ip })?;
    Ok(UnderlayDevice {
        ip,
        dev: link.name,
        mtu: link.mtu,
    })
}
