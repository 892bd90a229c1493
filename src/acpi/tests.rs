//! Whole-table tests: cross-table pointers, checksums, placement, guest memory and dumps, and
//! validation of the dumped tables with ACPICA's `iasl` and `acpiexec` (package acpica-tools).

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::dsdt::{cpu_device_name, memory_device_name};
use super::fadt::offsets as fadt_off;
use super::madt::{MADT_ENABLED, MADT_HEADER_LEN, MADT_ONLINE_CAPABLE, MADT_REVISION};
use super::*;

const SMALL: AcpiConfig = AcpiConfig {
    boot_cpus: 1,
    max_cpus: 4,
    memory_slots: 16,
    memory_removable: true,
    pvpanic: true,
    virtio_devices: 0,
};
const LARGEST: AcpiConfig = AcpiConfig {
    boot_cpus: 2,
    max_cpus: layout::MAX_VCPUS,
    memory_slots: layout::MAX_MEMORY_HOTPLUG_SLOTS,
    memory_removable: true,
    pvpanic: true,
    virtio_devices: layout::MAX_VIRTIO_DEVICES,
};
const NO_MEMORY_SLOTS: AcpiConfig = AcpiConfig {
    boot_cpus: 2,
    max_cpus: 3,
    memory_slots: 0,
    memory_removable: false,
    pvpanic: false,
    virtio_devices: 0,
};
const CONFIGS: [AcpiConfig; 3] = [SMALL, LARGEST, NO_MEMORY_SLOTS];

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn table<'a>(tables: &'a AcpiTables, signature: &str) -> &'a AcpiTable {
    tables
        .get(signature)
        .unwrap_or_else(|| panic!("no {signature} table"))
}

#[test]
fn every_table_checksums_to_zero() {
    for cfg in CONFIGS {
        let tables = build(&cfg).unwrap();
        let rsdp = &tables.rsdp.bytes;
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");

        let signatures: Vec<&str> = tables.tables.iter().map(|t| t.signature.as_str()).collect();
        assert_eq!(signatures, ["DSDT", "APIC", "FACP", "XSDT"]);
        for t in &tables.tables {
            assert_eq!(&t.bytes[0..4], t.signature.as_bytes());
            assert_eq!(
                u32_at(&t.bytes, 4) as usize,
                t.bytes.len(),
                "{}",
                t.signature
            );
            assert_eq!(sum(&t.bytes), 0, "{} checksum", t.signature);
        }
    }
}

#[test]
fn pointers_link_rsdp_xsdt_fadt_dsdt() {
    for cfg in CONFIGS {
        let tables = build(&cfg).unwrap();
        assert_eq!(tables.rsdp.addr, layout::RSDP_START);
        assert_eq!(u32_at(&tables.rsdp.bytes, 16), 0, "no RSDT");
        let xsdt = table(&tables, "XSDT");
        assert_eq!(u64_at(&tables.rsdp.bytes, 24), xsdt.addr);

        let entries: Vec<u64> = (36..xsdt.bytes.len())
            .step_by(8)
            .map(|off| u64_at(&xsdt.bytes, off))
            .collect();
        assert_eq!(
            entries,
            [table(&tables, "FACP").addr, table(&tables, "APIC").addr]
        );

        let fadt = &table(&tables, "FACP").bytes;
        assert_eq!(fadt.len(), fadt_off::LEN);
        assert_eq!(u64_at(fadt, fadt_off::X_DSDT), table(&tables, "DSDT").addr);
    }
}

#[test]
fn tables_are_placed_inside_the_acpi_area_without_overlap() {
    for cfg in CONFIGS {
        let tables = build(&cfg).unwrap();
        let mut end = tables.rsdp.addr + tables.rsdp.bytes.len() as u64;
        for t in &tables.tables {
            assert_eq!(t.addr % TABLE_ALIGN, 0, "{} alignment", t.signature);
            assert!(t.addr >= end, "{} overlaps the previous table", t.signature);
            end = t.addr + t.bytes.len() as u64;
        }
        assert!(end <= layout::ACPI_END);
    }
}

#[test]
fn largest_configuration_fits() {
    let tables = build(&LARGEST).unwrap();
    let last = tables.tables.last().unwrap();
    let used = last.addr + last.bytes.len() as u64 - layout::RSDP_START;
    assert!(
        used <= layout::ACPI_END - layout::RSDP_START,
        "{used} bytes"
    );
    let dsdt = &table(&tables, "DSDT").bytes;
    let has = |name: &str| dsdt.windows(4).any(|w| w == name.as_bytes());
    assert!(has("C0FD") && !has("C0FE"), "CPU devices C000..C0FD");
    assert!(has("M063") && !has("M064"), "memory devices M000..M063");
}

#[test]
fn madt_lists_every_possible_cpu() {
    for cfg in CONFIGS {
        let tables = build(&cfg).unwrap();
        let madt = &table(&tables, "APIC").bytes;
        assert_eq!(madt[8], MADT_REVISION);
        assert_eq!(u32_at(madt, 36) as u64, layout::APIC_START);
        let mut off = MADT_HEADER_LEN;
        let mut cpus = Vec::new();
        let mut ioapics = 0;
        let mut overrides = Vec::new();
        while off < madt.len() {
            let (kind, len) = (madt[off], usize::from(madt[off + 1]));
            assert!(len > 0 && off + len <= madt.len());
            match kind {
                0 => {
                    assert_eq!(madt[off + 2], madt[off + 3], "uid == apic id");
                    cpus.push((madt[off + 2], u32_at(madt, off + 4)));
                }
                1 => {
                    ioapics += 1;
                    assert_eq!(u32_at(madt, off + 4) as u64, layout::IOAPIC_START);
                }
                2 => overrides.push((madt[off + 3], u32_at(madt, off + 4))),
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(cpus.len(), cfg.max_cpus as usize);
        for (i, (id, flags)) in cpus.into_iter().enumerate() {
            assert_eq!(usize::from(id), i);
            let want = if (i as u32) < cfg.boot_cpus {
                MADT_ENABLED
            } else {
                MADT_ONLINE_CAPABLE
            };
            assert_eq!(flags, want, "CPU {i}");
        }
        assert_eq!(ioapics, 1);
        assert_eq!(overrides, [(4, 4)]);
    }
}

#[test]
fn invalid_configurations_are_rejected() {
    let cfg = |boot_cpus, max_cpus, memory_slots| AcpiConfig {
        boot_cpus,
        max_cpus,
        memory_slots,
        memory_removable: false,
        pvpanic: true,
        virtio_devices: 0,
    };
    assert!(matches!(build(&cfg(0, 4, 0)), Err(AcpiError::NoBootCpus)));
    assert!(matches!(
        build(&cfg(5, 4, 0)),
        Err(AcpiError::BootCpusExceedMax { boot: 5, max: 4 })
    ));
    assert!(matches!(
        build(&cfg(1, layout::MAX_VCPUS + 1, 0)),
        Err(AcpiError::TooManyCpus { .. })
    ));
    assert!(matches!(
        build(&cfg(1, 1, layout::MAX_MEMORY_HOTPLUG_SLOTS + 1)),
        Err(AcpiError::TooManyMemorySlots { .. })
    ));
    // A single CPU and no hotplug at all is fine.
    assert!(build(&cfg(1, 1, 0)).is_ok());
}

#[test]
fn build_is_deterministic() {
    assert_eq!(build(&SMALL).unwrap(), build(&SMALL).unwrap());
}

#[test]
fn write_copies_tables_into_guest_memory() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let tables = build(&SMALL).unwrap();
    write(&mem, &tables).unwrap();
    for t in std::iter::once(&tables.rsdp).chain(tables.tables.iter()) {
        let mut buf = vec![0u8; t.bytes.len()];
        mem.read_slice(&mut buf, GuestAddress(t.addr)).unwrap();
        assert_eq!(buf, t.bytes, "{}", t.signature);
    }
}

#[test]
fn write_fails_when_the_acpi_area_is_not_guest_memory() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let err = write(&mem, &build(&SMALL).unwrap()).unwrap_err();
    assert!(
        matches!(&err, AcpiError::GuestMemoryWrite { signature, addr, .. }
            if signature == "RSDP" && *addr == layout::RSDP_START),
        "{err}"
    );
}

/// A scratch directory (vmm-sys-util's, removed on drop).
fn temp_dir(tag: &str) -> vmm_sys_util::tempdir::TempDir {
    vmm_sys_util::tempdir::TempDir::new_with_prefix(
        std::env::temp_dir().join(format!("minivmm-acpi-{tag}-")),
    )
    .unwrap()
}

#[test]
fn dump_writes_one_file_per_table() {
    let tmp = temp_dir("dump");
    let dir = tmp.as_path().join("nested").join("tables");
    let tables = build(&SMALL).unwrap();
    dump(&dir, &tables).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["APIC.dat", "DSDT.dat", "FACP.dat", "RSDP.dat", "XSDT.dat"]
    );
    for t in std::iter::once(&tables.rsdp).chain(tables.tables.iter()) {
        let on_disk = std::fs::read(dir.join(format!("{}.dat", t.signature))).unwrap();
        assert_eq!(on_disk, t.bytes);
    }
}

#[test]
fn dump_reports_an_unusable_directory() {
    let tmp = temp_dir("dump-err");
    let file = tmp.as_path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let err = dump(&file.join("sub"), &build(&SMALL).unwrap()).unwrap_err();
    assert!(matches!(err, AcpiError::CreateDumpDir { .. }), "{err}");
}

/// Runs an ACPICA tool in `dir` with a timeout; returns (exit success, stdout + stderr).
/// A missing tool fails the test: the checks below are mandatory, never skipped.
fn run_tool(dir: &Path, program: &str, args: &[&str]) -> (bool, String) {
    let out_path = dir.join(format!("{program}.log"));
    let out = File::create(&out_path).unwrap();
    let err = out.try_clone().unwrap();
    let mut child = match Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "`{program}` not found: install acpica-tools (`apt-get install -y acpica-tools`) \
             to run the ACPI table validation tests"
        ),
        Err(e) => panic!("failed to start {program}: {e}"),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = String::from_utf8_lossy(&std::fs::read(&out_path).unwrap()).into_owned();
    (status.success(), output)
}

/// `iasl -d` on `<sig>.dat` must succeed without any error, warning or checksum complaint.
fn disassemble(dir: &Path, signature: &str) -> String {
    let dat = format!("{signature}.dat");
    let (ok, out) = run_tool(dir, "iasl", &["-d", &dat]);
    let lower = out.to_lowercase();
    assert!(
        ok && !["error", "warning", "incorrect", "invalid"]
            .iter()
            .any(|w| lower.contains(w)),
        "iasl -d {dat}:\n{out}"
    );
    let dsl = std::fs::read_to_string(dir.join(format!("{signature}.dsl"))).unwrap();
    assert!(
        !dsl.contains("Incorrect") && !dsl.contains("Invalid"),
        "{signature}.dsl:\n{dsl}"
    );
    dsl
}

/// Compiles `file` with iasl and requires a clean compilation.
fn compile(dir: &Path, file: &str) {
    let (ok, out) = run_tool(dir, "iasl", &[file]);
    assert!(
        ok && out.contains("Compilation successful. 0 Errors, 0 Warnings"),
        "iasl {file}:\n{out}"
    );
}

/// iasl cannot load an RSDP file (ACPICA's table file loader does not support RSDPs), so the
/// RSDP is checked by compiling its field listing with iasl's data table compiler, which
/// computes both checksums itself, and comparing the result with our bytes.
fn check_rsdp_with_iasl(dir: &Path, rsdp: &[u8]) {
    let source = format!(
        "[0008] Signature : \"RSD PTR \"\n\
         [0001] Checksum : 00\n\
         [0006] Oem ID : \"{}\"\n\
         [0001] Revision : {:02X}\n\
         [0004] RSDT Address : {:08X}\n\
         [0004] Length : {:08X}\n\
         [0008] XSDT Address : {:016X}\n\
         [0001] Extended Checksum : 00\n\
         [0003] Reserved : 000000\n",
        std::str::from_utf8(&rsdp[9..15]).unwrap(),
        rsdp[15],
        u32_at(rsdp, 16),
        u32_at(rsdp, 20),
        u64_at(rsdp, 24),
    );
    std::fs::write(dir.join("rsdp-src.asl"), source).unwrap();
    compile(dir, "rsdp-src.asl");
    assert_eq!(std::fs::read(dir.join("rsdp-src.aml")).unwrap(), rsdp);
}

#[test]
fn iasl_accepts_every_table() {
    for cfg in CONFIGS {
        let tmp = temp_dir("iasl");
        let tables = build(&cfg).unwrap();
        dump(tmp.as_path(), &tables).unwrap();

        check_rsdp_with_iasl(tmp.as_path(), &tables.rsdp.bytes);

        // Data tables: disassemble, recompile, and compare with the original. iasl writes its
        // own compiler ID/revision (bytes 28..36) and so its own checksum (byte 9).
        for sig in ["XSDT", "FACP", "APIC"] {
            disassemble(tmp.as_path(), sig);
            compile(tmp.as_path(), &format!("{sig}.dsl"));
            let ours = &table(&tables, sig).bytes;
            let theirs = std::fs::read(tmp.as_path().join(format!("{sig}.aml"))).unwrap();
            assert_eq!(theirs.len(), ours.len(), "{sig} length");
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                if i != 9 && !(28..36).contains(&i) {
                    assert_eq!(a, b, "{sig} byte {i} differs after an iasl round trip");
                }
            }
        }

        // DSDT: disassemble, then the ASL must compile with no error or warning (this also
        // resolves every name ESCN, CSCN, MSCN and the device methods refer to).
        let dsl = disassemble(tmp.as_path(), "DSDT");
        assert!(dsl.contains("DefinitionBlock (\"\", \"DSDT\", 2,"), "{dsl}");
        compile(tmp.as_path(), "DSDT.dsl");
    }
}

/// Parses the bytes of the first buffer acpiexec printed after `marker`.
fn acpiexec_buffer(out: &str, marker: &str) -> Vec<u8> {
    let start = out
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in:\n{out}"));
    let rest = &out[start..];
    let body = &rest[rest.find("[Buffer]").expect("no buffer returned")..];
    let mut bytes = Vec::new();
    for line in body.lines().skip(1) {
        let Some((offset, data)) = line.trim().split_once(':') else {
            break;
        };
        if u32::from_str_radix(offset, 16).is_err() {
            break;
        }
        let hex = data.split("//").next().unwrap();
        bytes.extend(
            hex.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap()),
        );
    }
    bytes
}

/// Runs `acpiexec` on the DSDT with every region byte initialised to `fill`, executing
/// `commands`; fails on any ACPICA error or warning.
fn acpiexec(dir: &Path, fill: u8, commands: &[String]) -> String {
    acpiexec_with(dir, fill, commands, &[])
}

/// [`acpiexec`] with extra options before the batch.
fn acpiexec_with(dir: &Path, fill: u8, commands: &[String], options: &[&str]) -> String {
    let batch = commands
        .iter()
        .map(|c| format!("execute {c}"))
        .collect::<Vec<_>>()
        .join("; ");
    let fill = format!("{fill:#x}");
    let mut args = options.to_vec();
    args.extend(["-fv", &fill, "-b", &batch, "DSDT.dat"]);
    let (ok, out) = run_tool(dir, "acpiexec", &args);
    assert!(ok, "acpiexec failed:\n{out}");
    // A notification's delivery thread that has not run when acpiexec exits (a loaded machine)
    // leaves its state allocated, which acpiexec's teardown reports as "Outstanding cache
    // allocations": not an AML error, so that one line is not held against the tables.
    let checked: Vec<&str> = out
        .lines()
        .filter(|l| !l.contains("Outstanding cache allocations"))
        .collect();
    for bad in ["Error", "AE_", "Warning", "failed", "Could not"] {
        assert!(
            !checked.iter().any(|l| l.contains(bad)),
            "acpiexec reported `{bad}`:\n{out}"
        );
    }
    for c in commands {
        let method = c.split_whitespace().next().unwrap();
        assert!(
            out.contains(&format!("Evaluating {method}")),
            "{method} not evaluated:\n{out}"
        );
    }
    out
}

#[test]
fn acpiexec_evaluates_hotplug_methods() {
    for cfg in CONFIGS {
        let tmp = temp_dir("acpiexec");
        dump(tmp.as_path(), &build(&cfg).unwrap()).unwrap();
        let slots = cfg.memory_slots > 0;

        // Registers read as zero: nothing is pending, so no notification at all.
        let mut commands = vec![
            "\\_SB_.CPUS.CSCN".to_string(),
            "\\_SB_.MHPC.MSCN".to_string(),
            "\\_SB_.GEC_.ESCN".to_string(),
            "\\_SB_.CPUS.C001._STA".to_string(),
        ];
        if slots {
            commands.push("\\_SB_.MHPC.M000._CRS".to_string());
        }
        let out = acpiexec(tmp.as_path(), 0, &commands);
        assert!(!out.contains("Notify"), "{out}");
        assert!(out.contains("[Integer] = 0000000000000000"), "{out}");
        if slots {
            let crs = acpiexec_buffer(&out, "Evaluating \\_SB_.MHPC.M000._CRS");
            assert_eq!(crs.len(), 48, "QWord descriptor + end tag");
            assert_eq!(crs[0], 0x8a);
        }

        // Registers read as all ones: CPUs and slots are present and inserting, and every GED
        // bit is set. The event-directed scans then read an impossible next index (all ones):
        // they notify no device and end after at most one round per possible device.
        let mut commands = vec!["\\_SB_.CPUS.C001._STA".to_string()];
        if slots {
            commands.push("\\_SB_.MHPC.M000._STA".to_string());
            commands.push("\\_SB_.MHPC.M000._CRS".to_string());
        }
        commands.push("\\_SB_.GEC_.ESCN".to_string());
        commands.push("\\_SB_.CPUS.COST 1 3 0x84".to_string());
        commands.push("\\_SB_.CPUS.CEJ0 1".to_string());
        if slots {
            commands.push("\\_SB_.MHPC.MOST 0 1 0".to_string());
            commands.push("\\_SB_.MHPC.M000._EJ0 1".to_string());
        }
        let out = acpiexec(tmp.as_path(), 0xff, &commands);
        let sta = out.matches("[Integer] = 000000000000000F").count();
        assert_eq!(sta, if slots { 2 } else { 1 }, "_STA results:\n{out}");
        assert!(!out.contains("System Notify on [C"), "{out}");
        assert!(!out.contains("System Notify on [M"), "{out}");
        assert!(out.contains("Notify on [PWRB]"), "{out}");
        if slots {
            // The selector write zeroed the low base DWord (MSEL aliases it); all other
            // registers read 0xFFFFFFFF: base 0xFFFFFFFF_00000000, length all ones.
            let crs = acpiexec_buffer(&out, "Evaluating \\_SB_.MHPC.M000._CRS");
            assert_eq!(u64_at(&crs, 14), 0xffff_ffff_0000_0000, "min");
            assert_eq!(
                u64_at(&crs, 22),
                0xffff_fffe_ffff_fffe,
                "max = min + len - 1"
            );
            assert_eq!(u64_at(&crs, 38), u64::MAX, "len");
        }

        // The notifiers the scans call reach every device by index (in batches: acpiexec takes
        // command lines of at most 1023 bytes). Counted where AML queues them (`-x 4` traces
        // "Dispatching Notify" in the evaluating thread): acpiexec delivers a notification on a
        // thread of its own, which may not have run when a loaded machine's acpiexec exits.
        let notifies: Vec<String> = (0..cfg.max_cpus)
            .map(|cpu| format!("\\_SB_.CPUS.CTFY {cpu} 1"))
            .chain((0..cfg.memory_slots).map(|slot| format!("\\_SB_.MHPC.MTFY {slot} 3")))
            .collect();
        let out: String = notifies
            .chunks(24)
            .map(|batch| acpiexec_with(tmp.as_path(), 0, batch, &["-x", "4"]))
            .collect();
        for cpu in 0..cfg.max_cpus {
            let name = cpu_device_name(cpu as u8);
            assert_eq!(
                out.matches(&format!("Dispatching Notify on [{name}] (Device) Value 0x01"))
                    .count(),
                1,
                "one Device Check for {name}, from CTFY:\n{out}"
            );
        }
        for slot in 0..cfg.memory_slots {
            let name = memory_device_name(slot);
            assert_eq!(
                out.matches(&format!("Dispatching Notify on [{name}] (Device) Value 0x03"))
                    .count(),
                1,
                "one Eject Request for {name}, from MTFY:\n{out}"
            );
        }
    }
}
