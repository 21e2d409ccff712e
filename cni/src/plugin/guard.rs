//! Rollback guards for ADD: each undoes one step on drop unless committed, so any early return
//! (`?`) leaves nothing behind. Locals drop in reverse order, which is the right undo order.

use crate::env::Attachment;
use crate::hostport::HostPortStore;
use crate::ipam::IpamStore;
use crate::netlink::Netlink;

/// Deletes a link in the plugin's own (host) namespace.
pub struct LinkGuard {
    name: Option<String>,
}

impl LinkGuard {
    pub fn new(name: &str) -> LinkGuard {
        LinkGuard {
            name: Some(name.to_string()),
        }
    }

    pub fn commit(mut self) {
        self.name = None;
    }
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else { return };
        // A fresh socket: the failing path may have left the caller's socket mid-conversation.
        // Deleting the host end also removes the peer inside the pod.
        if let Err(e) = Netlink::open().and_then(|mut nl| nl.delete_link_by_name(&name)) {
            eprintln!("veilnet-cni: rollback: cannot delete {name}: {e}");
        }
    }
}

/// Releases an attachment's address.
pub struct LeaseGuard<'a> {
    store: &'a IpamStore,
    attachment: Option<&'a Attachment>,
}

impl<'a> LeaseGuard<'a> {
    pub fn new(store: &'a IpamStore, attachment: &'a Attachment) -> LeaseGuard<'a> {
        LeaseGuard {
            store,
            attachment: Some(attachment),
        }
    }

    pub fn commit(mut self) {
        self.attachment = None;
    }
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        let Some(attachment) = self.attachment.take() else {
            return;
        };
        if let Err(e) = self.store.release(attachment) {
            eprintln!(
                "veilnet-cni: rollback: cannot release the address of {}/{}: {e}",
                attachment.container_id, attachment.ifname
            );
        }
    }
}

/// Drops an attachment's hostPort mappings (and their DNAT rules).
pub struct HostPortGuard<'a> {
    store: &'a HostPortStore,
    network: &'a str,
    attachment: Option<&'a Attachment>,
}

impl<'a> HostPortGuard<'a> {
    pub fn new(
        store: &'a HostPortStore,
        network: &'a str,
        attachment: &'a Attachment,
    ) -> HostPortGuard<'a> {
        HostPortGuard {
            store,
            network,
            attachment: Some(attachment),
        }
    }

    pub fn commit(mut self) {
        self.attachment = None;
    }
}

impl Drop for HostPortGuard<'_> {
    fn drop(&mut self) {
        let Some(attachment) = self.attachment.take() else {
            return;
        };
        if let Err(e) = self.store.remove(self.network, attachment) {
            eprintln!(
                "veilnet-cni: rollback: cannot remove the hostPort mappings of {}/{}: {e}",
                attachment.container_id, attachment.ifname
            );
        }
    }
}
