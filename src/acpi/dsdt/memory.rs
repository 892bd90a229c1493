//! The memory hotplug part of the DSDT: the controller `MHPC` with its scan, notify, status,
//! `_CRS` and eject methods, and one `PNP0C80` device `Mnnn` per hotplug slot.

use super::*;

// Memory hotplug controller objects.
pub(super) const MLCK: &str = "\\_SB_.MHPC.MLCK";
pub(super) const MSEL: &str = "\\_SB_.MHPC.MSEL";
pub(super) const MNEV: &str = "\\_SB_.MHPC.MNEV";
pub(super) const MEN: &str = "\\_SB_.MHPC.MEN_";
pub(super) const MINS: &str = "\\_SB_.MHPC.MINS";
pub(super) const MRMV: &str = "\\_SB_.MHPC.MRMV";
pub(super) const MEJ0: &str = "\\_SB_.MHPC.MEJ0";
pub(super) const MHBL: &str = "\\_SB_.MHPC.MHBL";
pub(super) const MHBH: &str = "\\_SB_.MHPC.MHBH";
pub(super) const MHLL: &str = "\\_SB_.MHPC.MHLL";
pub(super) const MHLH: &str = "\\_SB_.MHPC.MHLH";
pub(super) const MOEV: &str = "\\_SB_.MHPC.MOEV";
pub(super) const MOSC: &str = "\\_SB_.MHPC.MOSC";

/// Byte offsets of min, max and length inside a QWord address space descriptor.
pub(super) const QWORD_MIN_OFFSET: u8 = 14;
pub(super) const QWORD_MAX_OFFSET: u8 = 22;
pub(super) const QWORD_LEN_OFFSET: u8 = 38;

/// Name of the ACPI device of memory slot `slot`: `M` + 3 decimal digits.
pub(crate) fn memory_device_name(slot: usize) -> String {
    format!("M{slot:03}")
}

/// `MCRS(slot)`: a QWord memory descriptor patched from the selected slot's registers.
pub(super) fn memory_crs_method() -> RawAml {
    let template = name(
        "MR64",
        &aml::ResourceTemplate::new(vec![&AddressSpace::<u64>::new_memory(
            AddressSpaceCacheable::Cacheable,
            true,
            0,
            0,
            None,
        )]),
    );
    let mr64 = Path::new("MR64");
    let (min, max, len) = (Path::new("MINL"), Path::new("MAXL"), Path::new("LENL"));
    RawAml(aml_bytes(&aml::Method::new(
        "MCRS".into(),
        1,
        true,
        vec![
            &aml::Acquire::new(MLCK.into(), WAIT_FOREVER),
            &aml::Store::new(&Path::new(MSEL), &aml::Arg(0)),
            &template,
            &aml::CreateQWordField::new(&min, &mr64, &QWORD_MIN_OFFSET),
            &aml::CreateQWordField::new(&max, &mr64, &QWORD_MAX_OFFSET),
            &aml::CreateQWordField::new(&len, &mr64, &QWORD_LEN_OFFSET),
            // Local0 = base, Local1 = length, both assembled from two DWords.
            &aml::ShiftLeft::new(&aml::Local(0), &Path::new(MHBH), &32u8),
            &aml::Or::new(&aml::Local(0), &aml::Local(0), &Path::new(MHBL)),
            &aml::ShiftLeft::new(&aml::Local(1), &Path::new(MHLH), &32u8),
            &aml::Or::new(&aml::Local(1), &aml::Local(1), &Path::new(MHLL)),
            &aml::Store::new(&min, &aml::Local(0)),
            &aml::Store::new(&len, &aml::Local(1)),
            &aml::Add::new(&aml::Local(2), &aml::Local(0), &aml::Local(1)),
            &aml::Subtract::new(&max, &aml::Local(2), &aml::ONE),
            &aml::Release::new(MLCK.into()),
            &aml::Return::new(&mr64),
        ],
    )))
}

/// The memory device `Mnnn` of `slot`, with an `_EJ0` if hot-added memory is `removable`.
pub(super) fn memory_device(slot: usize, removable: bool) -> Vec<u8> {
    let index = slot as u64;
    let hid = name("_HID", &aml::EISAName::new("PNP0C80"));
    let uid = name("_UID", &index);
    let sta = forward0("_STA", "MSTA", &index);
    let crs = forward0("_CRS", "MCRS", &index);
    let ost = ost_method("MOST", &index);
    let eject = RawAml(aml_bytes(&aml::Method::new(
        "_EJ0".into(),
        1,
        false,
        vec![&aml::MethodCall::new("MDEJ".into(), vec![&index])],
    )));
    let mut children: Vec<&dyn Aml> = vec![&hid, &uid, &sta, &crs, &ost];
    if removable {
        children.push(&eject);
    }
    aml_bytes(&aml::Device::new(
        Path::new(&memory_device_name(slot)),
        children,
    ))
}

/// The memory hotplug controller `MHPC` with `slots` PNP0C80 devices (ejectable if
/// `removable`), or only an empty `MSCN` (so `ESCN` resolves) when there are none.
pub(super) fn memory_controller(slots: usize, removable: bool) -> Vec<u8> {
    let hid = name("_HID", &aml::EISAName::new("PNP0A06"));
    let uid = name("_UID", &"Memory Hotplug Controller");
    if slots == 0 {
        return aml_bytes(&aml::Device::new(
            "MHPC".into(),
            vec![
                &hid,
                &uid,
                &aml::Method::new("MSCN".into(), 0, true, vec![]),
            ],
        ));
    }
    let mtfy = notify_method(
        "MTFY",
        (0..slots).map(|slot| (slot as u64, memory_device_name(slot))),
    );
    // MNEV reads the next slot with an event at or after the selector (the slot count if none).
    let mscn = scan_method(
        "MSCN",
        slots as u64,
        MLCK,
        vec![
            &aml::Store::new(&Path::new(MSEL), &aml::Local(0)),
            &aml::Store::new(&aml::Local(1), &Path::new(MNEV)),
            &aml::Store::new(&Path::new(MSEL), &aml::Local(1)),
        ],
        (MINS, MRMV),
        "MTFY",
    );
    let msta = status_method("MSTA", MLCK, MSEL, MEN);
    let most = RawAml(aml_bytes(&aml::Method::new(
        "MOST".into(),
        3,
        true,
        vec![
            &aml::Acquire::new(MLCK.into(), WAIT_FOREVER),
            &aml::Store::new(&Path::new(MSEL), &aml::Arg(0)),
            &aml::Store::new(&Path::new(MOEV), &aml::Arg(1)),
            &aml::Store::new(&Path::new(MOSC), &aml::Arg(2)),
            &aml::Release::new(MLCK.into()),
        ],
    )));
    // MDEJ(slot): the guest's eject of a slot it has offlined and removed.
    let mdej = RawAml(aml_bytes(&aml::Method::new(
        "MDEJ".into(),
        1,
        true,
        vec![
            &aml::Acquire::new(MLCK.into(), WAIT_FOREVER),
            &aml::Store::new(&Path::new(MSEL), &aml::Arg(0)),
            &aml::Store::new(&Path::new(MEJ0), &aml::ONE),
            &aml::Release::new(MLCK.into()),
        ],
    )));
    let devices = RawAml(
        (0..slots)
            .flat_map(|slot| memory_device(slot, removable))
            .collect(),
    );
    aml_bytes(&aml::Device::new(
        "MHPC".into(),
        vec![
            &hid,
            &uid,
            &aml::Mutex::new("MLCK".into(), 0),
            &memory_crs(layout::MEM_HOTPLUG_START, layout::MEM_HOTPLUG_SIZE),
            &aml::OpRegion::new(
                "MHPR".into(),
                OpRegionSpace::SystemMemory,
                &layout::MEM_HOTPLUG_START,
                &layout::MEM_HOTPLUG_SIZE,
            ),
            // Read side: base and length of the selected slot, proximity.
            &dword_fields("MHPR", &mem_hotplug::READ_FIELDS),
            // Status/ack byte at +0x14.
            &byte_fields("MHPR", &mem_hotplug::FLAG_FIELDS),
            // Write side: selector and _OST event/status.
            &dword_fields("MHPR", &mem_hotplug::WRITE_FIELDS),
            // Next slot with an event, at +0x18.
            &dword_fields("MHPR", &mem_hotplug::EVENT_FIELDS),
            &mtfy,
            &mscn,
            &msta,
            &memory_crs_method(),
            &most,
            &mdej,
            &devices,
        ],
    ))
}
