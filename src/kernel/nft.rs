//! The nft runner lives in [`crate::netfilter::nft`]; this path stays only for callers outside
//! the netfilter room that still name `kernel::nft` (`agent::reconcile`'s error), until they
//! import [`crate::netfilter`] directly.

pub use crate::netfilter::nft::*;
pub use crate::netfilter::NetfilterError as NftError;
