//! The CPU hotplug part of the DSDT: the controller `PRES`, the container `CPUS` with its scan,
//! notify, status and eject methods, and one device `Cnnn` per possible CPU.

use super::*;

// CPU hotplug controller objects.
pub(super) const CPLK: &str = "\\_SB_.PRES.CPLK";
pub(super) const CSEL: &str = "\\_SB_.PRES.CSEL";
pub(super) const CPEN: &str = "\\_SB_.PRES.CPEN";
pub(super) const CINS: &str = "\\_SB_.PRES.CINS";
pub(super) const CRMV: &str = "\\_SB_.PRES.CRMV";
pub(super) const CEJ0: &str = "\\_SB_.PRES.CEJ0";
pub(super) const CCMD: &str = "\\_SB_.PRES.CCMD";
pub(super) const CDAT: &str = "\\_SB_.PRES.CDAT";

/// Name of the ACPI device of CPU `cpu`: `C` + 3 hex digits.
pub(crate) fn cpu_device_name(cpu: u8) -> String {
    format!("C{cpu:03X}")
}

/// The CPU hotplug controller `PRES` (registers and lock).
pub(super) fn cpu_controller() -> Vec<u8> {
    aml_bytes(&aml::Device::new(
        "PRES".into(),
        vec![
            &name("_HID", &aml::EISAName::new("PNP0A06")),
            &name("_UID", &"CPU Hotplug Controller"),
            &aml::Mutex::new("CPLK".into(), 0),
            &memory_crs(layout::CPU_HOTPLUG_START, layout::CPU_HOTPLUG_SIZE),
            &aml::OpRegion::new(
                "PRST".into(),
                OpRegionSpace::SystemMemory,
                &layout::CPU_HOTPLUG_START,
                &layout::CPU_HOTPLUG_SIZE,
            ),
            // Flags byte at +4 and command byte at +5; unwritten flag bits read as zero.
            &byte_fields("PRST", &cpu_hotplug::BYTE_FIELDS),
            // Selector at +0 and command data at +8.
            &dword_fields("PRST", &cpu_hotplug::DWORD_FIELDS),
        ],
    ))
}

/// The `Cnnn` devices of CPUs `0..max`. From CPU 2 on, devices differ only in the CPU number
/// (two name digits, the index constants, the `_MAT` bytes), each encoded at the same width, so
/// they are copies of one built device with those bytes replaced: building 252 devices through
/// acpi_tables took about 1 ms, most of minivmm's start-up at `max=254`. Positions are found by
/// building two devices whose numbers differ in every digit; anything unexpected falls back to
/// building each device (a test compares both ways for every CPU).
pub(super) fn cpu_devices(max: u8) -> Vec<u8> {
    let mut out: Vec<u8> = (0..max.min(2)).flat_map(cpu_device).collect();
    if max <= 2 {
        return out;
    }
    let (ta, slots) = cpu_device_template();
    let Some(slots) = slots else {
        out.extend((2..max).flat_map(cpu_device));
        return out;
    };
    for cpu in 2..max {
        let name = cpu_device_name(cpu).into_bytes();
        let start = out.len();
        out.extend_from_slice(&ta);
        for &(i, what) in &slots {
            out[start + i] = match what {
                0 => cpu,
                1 => name[2],
                _ => name[3],
            };
        }
    }
    out
}

/// A CPU device to copy (CPU 0x12's) and its variable bytes: (offset, 0 = the CPU number,
/// 1 = the middle name digit, 2 = the last), or None if the two probes differ unexpectedly.
pub(super) fn cpu_device_template() -> (Vec<u8>, Option<Vec<(usize, u8)>>) {
    let (ta, tb) = (cpu_device(0x12), cpu_device(0x21));
    let slots = (ta.len() == tb.len())
        .then(|| {
            ta.iter()
                .zip(&tb)
                .enumerate()
                .filter(|(_, (x, y))| x != y)
                .map(|(i, pair)| match pair {
                    (0x12, 0x21) => Some((i, 0)),
                    (b'1', b'2') => Some((i, 1)),
                    (b'2', b'1') => Some((i, 2)),
                    _ => None,
                })
                .collect()
        })
        .flatten();
    (ta, slots)
}

/// The per-CPU device `Cnnn`.
pub(super) fn cpu_device(cpu: u8) -> Vec<u8> {
    let index = u64::from(cpu);
    let eject = RawAml(aml_bytes(&aml::Method::new(
        "_EJ0".into(),
        1,
        false,
        vec![&aml::MethodCall::new("CEJ0".into(), vec![&index])],
    )));
    let uid = name("_UID", &index);
    let sta = forward0("_STA", "CSTA", &index);
    let pxm = name("_PXM", &aml::ZERO);
    let mat = name(
        "_MAT",
        &aml::BufferData::new(madt::local_apic_entry(cpu, true)),
    );
    let ost = ost_method("COST", &index);
    let hid = name("_HID", &"ACPI0007");
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid, &sta, &pxm, &mat];
    // The boot CPU cannot be ejected.
    if cpu != 0 {
        children.push(&eject);
    }
    children.push(&ost);
    aml_bytes(&aml::Device::new(
        Path::new(&cpu_device_name(cpu)),
        children,
    ))
}

/// The CPU container `CPUS` with its methods and one device per possible CPU.
pub(super) fn cpu_container(max_cpus: u8) -> Vec<u8> {
    let csta = status_method("CSTA", CPLK, CSEL, CPEN);
    let ctfy = notify_method(
        "CTFY",
        (0..max_cpus).map(|cpu| (u64::from(cpu), cpu_device_name(cpu))),
    );
    let cej0 = RawAml(aml_bytes(&aml::Method::new(
        "CEJ0".into(),
        1,
        true,
        vec![
            &aml::Acquire::new(CPLK.into(), WAIT_FOREVER),
            &aml::Store::new(&Path::new(CSEL), &aml::Arg(0)),
            &aml::Store::new(&Path::new(CEJ0), &aml::ONE),
            &aml::Release::new(CPLK.into()),
        ],
    )));
    // Command 0 moves the selector to the next CPU with an event; CDAT then reads its index.
    let cscn = scan_method(
        "CSCN",
        u64::from(max_cpus),
        CPLK,
        vec![
            &aml::Store::new(&Path::new(CSEL), &aml::Local(0)),
            &aml::Store::new(&Path::new(CCMD), &CCMD_NEXT_EVENT),
            &aml::Store::new(&aml::Local(1), &Path::new(CDAT)),
        ],
        (CINS, CRMV),
        "CTFY",
    );
    // _OST: the event and then the status go through CDAT; the device reports on the status.
    let cost = RawAml(aml_bytes(&aml::Method::new(
        "COST".into(),
        3,
        true,
        vec![
            &aml::Acquire::new(CPLK.into(), WAIT_FOREVER),
            &aml::Store::new(&Path::new(CSEL), &aml::Arg(0)),
            &aml::Store::new(&Path::new(CCMD), &CCMD_OST_EVENT),
            &aml::Store::new(&Path::new(CDAT), &aml::Arg(1)),
            &aml::Store::new(&Path::new(CCMD), &CCMD_OST_STATUS),
            &aml::Store::new(&Path::new(CDAT), &aml::Arg(2)),
            &aml::Release::new(CPLK.into()),
        ],
    )));
    let devices = RawAml(cpu_devices(max_cpus));
    aml_bytes(&aml::Device::new(
        "CPUS".into(),
        vec![
            &name("_HID", &"ACPI0010"),
            &name("_CID", &aml::EISAName::new("PNP0A05")),
            &csta,
            &ctfy,
            &cej0,
            &cscn,
            &cost,
            &devices,
        ],
    ))
}
