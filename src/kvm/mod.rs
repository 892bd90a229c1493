//! The KVM objects: the VM and its memory slots, one vCPU and its run loop, the set of vCPU
//! threads, and guest RAM mappings.

pub(crate) mod ram;
pub(crate) mod vcpu;
pub(crate) mod vcpus;
pub(crate) mod vm;
