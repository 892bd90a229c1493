//! The KVM objects: the VM and its memory slots, one vCPU and its run loop, the set of vCPU
//! threads, and guest RAM mappings.

pub mod ram;
pub mod vcpu;
pub mod vcpus;
pub mod vm;
