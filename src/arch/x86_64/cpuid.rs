//! Guest CPUID: `KVM_GET_SUPPORTED_CPUID` output patched with the vCPU's identity and topology.
//!
//! Topology model: one package, one thread per core, `max_vcpus` cores. The APIC ID of vCPU
//! `id` is `id`; the core field of the APIC ID is `ceil(log2(max_vcpus))` bits wide. The same
//! numbers are reported through every leaf a Linux guest may consult (1, 4, 0xB, 0x1F on Intel;
//! 1, 0xB, 0x8000_0001/8/1D/1E on AMD), so every vCPU, including ones hot-added later, agrees
//! with the others.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// CPU vendor, as reported by CPUID leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD" or "HygonGenuine" (same topology leaves).
    Amd,
    /// Anything else: only vendor-neutral leaves are patched.
    Other,
}

/// Leaf 0 EBX, EDX, ECX of "GenuineIntel".
const INTEL_SIGNATURE: [u32; 3] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e];
/// Leaf 0 EBX, EDX, ECX of "AuthenticAMD".
const AMD_SIGNATURE: [u32; 3] = [0x6874_7541, 0x6974_6e65, 0x444d_4163];
/// Leaf 0 EBX, EDX, ECX of "HygonGenuine".
const HYGON_SIGNATURE: [u32; 3] = [0x6f67_7948, 0x6e65_476e, 0x656e_6975];

/// Leaf 1 ECX bit 15: perfmon and debug capability (IA32_PERF_CAPABILITIES).
const LEAF1_ECX_PDCM: u32 = 1 << 15;
/// Leaf 1 ECX bit 24: TSC-deadline LAPIC timer mode.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX bit 31: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT (leaf 1 `EBX[23:16]` is valid / multi-processor package).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;

/// Leaf 0xB / 0x1F level type "SMT".
const LEVEL_TYPE_SMT: u32 = 1;
/// Leaf 0xB / 0x1F level type "Core".
const LEVEL_TYPE_CORE: u32 = 2;

/// 0x4000_0001 EAX bit 1: KVM_FEATURE_NOP_IO_DELAY.
pub const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;

/// 0x8000_0001 ECX bit 1: CmpLegacy.
pub const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
/// 0x8000_0001 ECX bit 22: TOPOEXT (leaves 0x8000_001D/1E are valid).
pub const AMD_ECX_TOPOEXT: u32 = 1 << 22;

/// Reads the vendor from leaf 0.
pub fn cpu_vendor(cpuid: &CpuId) -> CpuVendor {
    match find_entry(cpuid, 0, 0) {
        Some(e) => {
            let sig = [e.ebx, e.edx, e.ecx];
            if sig == INTEL_SIGNATURE {
                CpuVendor::Intel
            } else if sig == AMD_SIGNATURE || sig == HYGON_SIGNATURE {
                CpuVendor::Amd
            } else {
                CpuVendor::Other
            }
        }
        None => CpuVendor::Other,
    }
}

/// The entry for `function` / `index` (index ignored for leaves without a significant index).
pub fn find_entry(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

/// Number of APIC ID bits needed to number `count` cores: ceil(log2(count)).
pub fn apic_id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

/// Patches KVM_GET_SUPPORTED_CPUID output for vCPU `id` of `max_vcpus`: leaf 1 `EBX[31:24]` APIC ID
/// = id, `EBX[23:16]` logical count, CLFLUSH 8, ECX hypervisor bit + TSC-deadline, EDX HTT when
/// max_vcpus > 1; leaf 0xB (and 0x1F if present) EDX x2APIC id and level shifts/counts sized for
/// max_vcpus (one thread per core, cores per package = max_vcpus); leaf 4 (Intel) cores field
/// consistent; AMD: 0x8000_0001 ECX CmpLegacy/TOPOEXT consistent, 0x8000_0008 ECX thread
/// count/ApicIdSize, 0x8000_001E extended APIC id = id; leaf 0xA (PMU) zeroed; KVM leaves
/// 0x4000_0000/1 kept (add NOP_IO_DELAY bit 1 to 0x4000_0001 EAX so Linux never writes port
/// 0x80). Works on Intel and AMD hosts (vendor from leaf 0).
///
/// `max_vcpus` is clamped to 1..=255 (APIC IDs are 8 bits in leaf 1).
pub fn patch_cpuid(cpuid: &mut CpuId, id: u32, max_vcpus: u32) {
    let max = max_vcpus.clamp(1, 255);
    let vendor = cpu_vendor(cpuid);
    let core_bits = apic_id_bits(max);
    // "Maximum number of addressable IDs" fields count the whole APIC ID space of the package.
    let package_ids = 1u32 << core_bits;
    let max_basic = find_entry(cpuid, 0, 0).map_or(0, |e| e.eax);
    let has_leaf_1e = find_entry(cpuid, 0x8000_001e, 0).is_some();

    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx =
                    (e.ebx & 0xff) | (CLFLUSH_LINE_SIZE << 8) | (max << 16) | ((id & 0xff) << 24);
                e.ecx = (e.ecx | LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE) & !LEAF1_ECX_PDCM;
                if max > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 if vendor == CpuVendor::Intel && e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                // L1/L2 belong to one core (one thread); L3 is shared by the package.
                let sharing = if level >= 3 { package_ids - 1 } else { 0 };
                let cores = (package_ids - 1).min(0x3f);
                e.eax = (e.eax & 0x3fff) | (sharing.min(0xfff) << 14) | (cores << 26);
            }
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x4000_0001 => e.eax |= KVM_FEATURE_NOP_IO_DELAY,
            0x8000_0001 if vendor == CpuVendor::Amd => {
                if max > 1 {
                    e.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !AMD_ECX_CMP_LEGACY;
                }
                if !has_leaf_1e {
                    e.ecx &= !AMD_ECX_TOPOEXT;
                }
            }
            0x8000_0008 if vendor == CpuVendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (max - 1);
            }
            0x8000_001d if vendor == CpuVendor::Amd && e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { package_ids - 1 } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
            }
            0x8000_001e if vendor == CpuVendor::Amd => {
                e.eax = id;
                // Core id = id, one thread per core.
                e.ebx = (e.ebx & !0xffff) | (id & 0xff);
                // Node 0, one node per package.
                e.ecx &= !0x7ff;
                e.edx = 0;
            }
            _ => {}
        }
    }

    if max_basic >= 0xb {
        set_topology_leaf(cpuid, 0xb, id, max, core_bits);
    }
    if max_basic >= 0x1f && find_entry(cpuid, 0x1f, 0).is_some() {
        set_topology_leaf(cpuid, 0x1f, id, max, core_bits);
    }
}

/// The three subleaves (SMT, core, terminator) of leaf 0xB / 0x1F for vCPU `id`.
pub fn topology_entries(
    function: u32,
    id: u32,
    max_vcpus: u32,
    core_bits: u32,
) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: id,
        ..Default::default()
    };
    [
        // One thread per core: no SMT bits in the APIC ID.
        entry(0, 0, 1, LEVEL_TYPE_SMT),
        entry(1, core_bits, max_vcpus, LEVEL_TYPE_CORE),
        entry(2, 0, 0, 0),
    ]
}

/// Replaces every subleaf of `function` with [`topology_entries`].
fn set_topology_leaf(cpuid: &mut CpuId, function: u32, id: u32, max: u32, core_bits: u32) {
    let new = topology_entries(function, id, max, core_bits);
    let old: Vec<kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function == function)
        .copied()
        .collect();
    cpuid.retain(|e| e.function != function);
    for e in new {
        if cpuid.push(e).is_err() {
            // The list is full (256 entries): put the original entries back and patch them in
            // place, which keeps at least the x2APIC ID correct.
            log::warn!("CPUID list full; patching leaf {function:#x} in place");
            cpuid.retain(|e| e.function != function);
            for mut o in old {
                if let Some(n) = new.get(o.index as usize) {
                    o.eax = n.eax;
                    o.ebx = n.ebx;
                    o.ecx = n.ecx;
                }
                o.edx = id;
                // Cannot fail: as many entries as were removed.
                let _ = cpuid.push(o);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 4 | 0xb | 0x1f | 0x8000_001d) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn leaf0(max: u32, sig: [u32; 3]) -> kvm_cpuid_entry2 {
        e(0, 0, [max, sig[0], sig[2], sig[1]])
    }

    /// A trimmed Intel host list, as KVM_GET_SUPPORTED_CPUID would return it.
    fn intel() -> CpuId {
        CpuId::from_entries(&[
            leaf0(0x1f, INTEL_SIGNATURE),
            // Host: APIC ID 0x13, 16 logical, HTT, PDCM set.
            e(
                1,
                0,
                [0x000906ea, 0x1310_0800 | 0x42, 0x7ffa_fbff, 0xbfeb_fbff],
            ),
            e(4, 0, [0x1c00_4121, 0x01c0_003f, 0x3f, 0]),
            e(4, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0]),
            e(4, 2, [0x1c00_4143, 0x00c0_003f, 0x3ff, 0]),
            e(4, 3, [0x1c03_c163, 0x03c0_003f, 0x2fff, 6]),
            e(4, 4, [0, 0, 0, 0]),
            e(0xa, 0, [0x0704_3004, 0, 0, 0x603]),
            e(0xb, 0, [1, 2, 0x100, 0x13]),
            e(0xb, 1, [4, 12, 0x201, 0x13]),
            e(0x1f, 0, [1, 2, 0x100, 0x13]),
            e(0x1f, 1, [4, 12, 0x201, 0x13]),
            e(0x1f, 2, [0, 0, 2, 0x13]),
            e(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            e(0x4000_0001, 0, [0x0100_00f9, 0, 0, 0]),
            e(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0008, 0, [0x3027, 0, 0, 0]),
        ])
        .unwrap()
    }

    /// A trimmed AMD host list.
    fn amd() -> CpuId {
        CpuId::from_entries(&[
            leaf0(0x10, AMD_SIGNATURE),
            e(1, 0, [0x00a0_0f11, 0x0520_0800, 0x7ef8_3203, 0x178b_fbff]),
            e(0xb, 0, [1, 2, 0x100, 5]),
            e(0x4000_0001, 0, [0x0100_00fb, 0, 0, 0]),
            e(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            e(
                0x8000_0001,
                0,
                [0, 0, 0x75c2_37ff | AMD_ECX_TOPOEXT, 0x2fd3_fbff],
            ),
            e(0x8000_0008, 0, [0x3030, 0, 0x0001_7007, 0]),
            e(0x8000_001d, 0, [0x0000_4121, 0x01c0_003f, 0x3f, 0]),
            e(0x8000_001d, 1, [0x0000_4143, 0x01c0_003f, 0x3ff, 2]),
            e(0x8000_001d, 2, [0x0003_c163, 0x03c0_003f, 0x7fff, 1]),
            e(0x8000_001e, 0, [5, 0x0000_0102, 0x0000_0300, 0]),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *find_entry(c, f, i).unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
    }

    #[test]
    fn vendor_detection() {
        assert_eq!(cpu_vendor(&intel()), CpuVendor::Intel);
        assert_eq!(cpu_vendor(&amd()), CpuVendor::Amd);
        let hygon = CpuId::from_entries(&[leaf0(0xd, HYGON_SIGNATURE)]).unwrap();
        assert_eq!(cpu_vendor(&hygon), CpuVendor::Amd);
        let other = CpuId::from_entries(&[leaf0(0xd, [1, 2, 3])]).unwrap();
        assert_eq!(cpu_vendor(&other), CpuVendor::Other);
    }

    #[test]
    fn apic_id_bits_values() {
        assert_eq!(apic_id_bits(0), 0);
        assert_eq!(apic_id_bits(1), 0);
        assert_eq!(apic_id_bits(2), 1);
        assert_eq!(apic_id_bits(3), 2);
        assert_eq!(apic_id_bits(4), 2);
        assert_eq!(apic_id_bits(5), 3);
        assert_eq!(apic_id_bits(254), 8);
    }

    #[test]
    fn leaf1_apic_id_for_several_ids() {
        for (id, max) in [(0, 1), (0, 4), (1, 4), (3, 4), (7, 8), (200, 254)] {
            for mut c in [intel(), amd()] {
                patch_cpuid(&mut c, id, max);
                let l1 = get(&c, 1, 0);
                assert_eq!(l1.ebx >> 24, id, "APIC ID");
                assert_eq!((l1.ebx >> 16) & 0xff, max, "logical count");
                assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH");
                assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
                assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
                assert_eq!(l1.ecx & LEAF1_ECX_PDCM, 0);
                assert_eq!(
                    l1.edx & LEAF1_EDX_HTT != 0,
                    max > 1,
                    "HTT id {id} max {max}"
                );
            }
        }
    }

    #[test]
    fn leaf1_brand_index_kept() {
        let mut c = intel();
        patch_cpuid(&mut c, 2, 4);
        assert_eq!(get(&c, 1, 0).ebx & 0xff, 0x42);
    }

    #[test]
    fn htt_cleared_for_single_vcpu() {
        let mut c = intel();
        patch_cpuid(&mut c, 0, 1);
        assert_eq!(get(&c, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn leaf_b_topology_intel() {
        let mut c = intel();
        patch_cpuid(&mut c, 5, 6);
        let smt = get(&c, 0xb, 0);
        let core = get(&c, 0xb, 1);
        let end = get(&c, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        assert_eq!((end.eax, end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 0, 5));
        assert_eq!(end.ecx & 0xff, 2);
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
        // 0x1F mirrors 0xB and loses the host's extra levels.
        assert_eq!(get(&c, 0x1f, 1).eax, 3);
        assert_eq!(get(&c, 0x1f, 2).ecx & 0xff00, 0);
        assert_eq!(get(&c, 0x1f, 0).edx, 5);
        assert_eq!(
            c.as_slice().iter().filter(|e| e.function == 0x1f).count(),
            3
        );
    }

    #[test]
    fn leaf_b_added_on_amd_when_basic_range_covers_it() {
        let mut c = amd();
        patch_cpuid(&mut c, 9, 16);
        assert_eq!(get(&c, 0xb, 0).edx, 9);
        assert_eq!(get(&c, 0xb, 1).eax, 4);
        assert_eq!(get(&c, 0xb, 1).ebx, 16);
        // AMD list had no 0x1F: none is invented.
        assert!(find_entry(&c, 0x1f, 0).is_none());
    }

    #[test]
    fn leaf4_cores_field_intel() {
        let mut c = intel();
        patch_cpuid(&mut c, 0, 6);
        for i in 0..4 {
            let l4 = get(&c, 4, i);
            assert_eq!(l4.eax >> 26, 7, "cores-1 for 8 APIC IDs, subleaf {i}");
            let level = (l4.eax >> 5) & 7;
            let sharing = (l4.eax >> 14) & 0xfff;
            assert_eq!(sharing, if level == 3 { 7 } else { 0 }, "subleaf {i}");
            // Cache type/level bits kept.
            assert_eq!(
                l4.eax & 0x3fff,
                intel().as_slice()[2 + i as usize].eax & 0x3fff
            );
        }
        // The null subleaf stays null.
        assert_eq!(get(&c, 4, 4).eax, 0);
    }

    #[test]
    fn pmu_leaf_zeroed() {
        let mut c = intel();
        patch_cpuid(&mut c, 0, 2);
        let a = get(&c, 0xa, 0);
        assert_eq!((a.eax, a.ebx, a.ecx, a.edx), (0, 0, 0, 0));
    }

    #[test]
    fn kvm_leaves_kept_with_nop_io_delay() {
        for mut c in [intel(), amd()] {
            let before = get(&c, 0x4000_0001, 0).eax;
            patch_cpuid(&mut c, 1, 2);
            assert_eq!(
                get(&c, 0x4000_0001, 0).eax,
                before | KVM_FEATURE_NOP_IO_DELAY
            );
        }
        let mut c = intel();
        patch_cpuid(&mut c, 1, 2);
        let sig = get(&c, 0x4000_0000, 0);
        assert_eq!(
            (sig.ebx, sig.ecx, sig.edx),
            (0x4b4d_564b, 0x564b_4d56, 0x4d)
        );
    }

    #[test]
    fn amd_extended_topology() {
        for id in [0, 1, 3] {
            let mut c = amd();
            patch_cpuid(&mut c, id, 4);
            let e1 = get(&c, 0x8000_0001, 0);
            assert_ne!(e1.ecx & AMD_ECX_CMP_LEGACY, 0);
            assert_ne!(e1.ecx & AMD_ECX_TOPOEXT, 0);
            let e8 = get(&c, 0x8000_0008, 0);
            assert_eq!(e8.ecx & 0xff, 3, "NC = threads - 1");
            assert_eq!((e8.ecx >> 12) & 0xf, 2, "ApicIdSize");
            assert_eq!(e8.ecx & 0x3_0000, 0x1_0000, "other bits kept");
            let e1e = get(&c, 0x8000_001e, 0);
            assert_eq!(e1e.eax, id, "extended APIC ID");
            assert_eq!(e1e.ebx & 0xff, id, "core id");
            assert_eq!((e1e.ebx >> 8) & 0xff, 0, "one thread per core");
            assert_eq!(e1e.ecx & 0x7ff, 0, "node 0, one node");
            assert_eq!(get(&c, 0x8000_001d, 0).eax >> 14 & 0xfff, 0);
            assert_eq!(get(&c, 0x8000_001d, 2).eax >> 14 & 0xfff, 3);
            assert_eq!(get(&c, 0x8000_001d, 2).eax & 0x3fff, 0x0163);
        }
    }

    #[test]
    fn amd_single_vcpu_clears_cmp_legacy() {
        let mut c = amd();
        patch_cpuid(&mut c, 0, 1);
        assert_eq!(get(&c, 0x8000_0001, 0).ecx & AMD_ECX_CMP_LEGACY, 0);
        assert_eq!(get(&c, 0x8000_0008, 0).ecx & 0xf0ff, 0);
    }

    #[test]
    fn amd_topoext_cleared_without_leaf_1e() {
        let mut c = amd();
        c.retain(|e| e.function != 0x8000_001e);
        patch_cpuid(&mut c, 0, 2);
        assert_eq!(get(&c, 0x8000_0001, 0).ecx & AMD_ECX_TOPOEXT, 0);
    }

    #[test]
    fn intel_extended_leaves_untouched() {
        let mut c = intel();
        patch_cpuid(&mut c, 3, 4);
        assert_eq!(get(&c, 0x8000_0008, 0).ecx, 0);
    }

    #[test]
    fn full_list_falls_back_to_in_place_patch() {
        let mut entries: Vec<kvm_cpuid_entry2> = intel().as_slice().to_vec();
        // Keep a single 0xB subleaf, then pad to capacity so the rebuilt leaf cannot fit.
        entries.retain(|e| e.function != 0xb);
        entries.push(e(0xb, 0, [1, 2, 0x100, 0]));
        let mut f = 0x4000_1000;
        while entries.len() < kvm_bindings::KVM_MAX_CPUID_ENTRIES {
            entries.push(e(f, 0, [0; 4]));
            f += 1;
        }
        let mut c = CpuId::from_entries(&entries).unwrap();
        patch_cpuid(&mut c, 4, 8);
        assert_eq!(c.as_slice().len(), kvm_bindings::KVM_MAX_CPUID_ENTRIES);
        let smt = get(&c, 0xb, 0);
        assert_eq!((smt.edx, smt.ebx), (4, 1));
    }
}
