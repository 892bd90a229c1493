//! ACPI tables for a hardware-reduced minivmm guest: RSDP, XSDT, FADT, MADT and a DSDT
//! describing COM1, the RTC, the power button, the Generic Event Device and the CPU and
//! memory hotplug controllers.
//!
//! [`build`] is pure and cheap, so the tables can be regenerated at every (re)boot from the
//! current configuration; [`write()`] copies them into guest memory and [`dump`] writes them to
//! files for inspection with `iasl -d`.

mod dsdt;
mod fadt;
mod madt;

use std::io;
use std::path::{Path, PathBuf};

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::arch::x86_64::layout;

/// OEM ID written into every table header.
const OEM_ID: [u8; 6] = *b"MINVMM";
/// OEM revision written into every table header.
const OEM_REVISION: u32 = 1;
/// Alignment of every table after the RSDP.
const TABLE_ALIGN: u64 = 16;

/// Errors raised while building, writing or dumping the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The configuration asks for no boot CPU.
    #[error("invalid ACPI configuration: boot_cpus must be at least 1")]
    NoBootCpus,
    /// More boot CPUs than possible CPUs.
    #[error("invalid ACPI configuration: boot_cpus ({boot}) exceeds max_cpus ({max})")]
    BootCpusExceedMax {
        /// Requested boot CPUs.
        boot: u32,
        /// Requested possible CPUs.
        max: u32,
    },
    /// More possible CPUs than MADT type-0 entries can describe.
    #[error("invalid ACPI configuration: max_cpus ({max}) exceeds the limit of {limit}")]
    TooManyCpus {
        /// Requested possible CPUs.
        max: u32,
        /// Highest supported value.
        limit: u32,
    },
    /// More memory hotplug slots than supported.
    #[error("invalid ACPI configuration: memory_slots ({slots}) exceeds the limit of {limit}")]
    TooManyMemorySlots {
        /// Requested slots.
        slots: usize,
        /// Highest supported value.
        limit: usize,
    },
    /// The tables do not fit into the ACPI area of the guest-physical layout.
    #[error(
        "ACPI tables end at {end:#x}, past the end of the ACPI area at {limit:#x} \
         ({size} bytes needed from {start:#x})"
    )]
    TooLarge {
        /// Start of the ACPI area.
        start: u64,
        /// End (exclusive) the tables would need.
        end: u64,
        /// End (exclusive) of the ACPI area.
        limit: u64,
        /// Bytes needed from `start`.
        size: u64,
    },
    /// Copying a table into guest memory failed.
    #[error("failed to write ACPI table {signature} ({len} bytes) to guest memory at {addr:#x}: {source}")]
    GuestMemoryWrite {
        /// Signature of the table.
        signature: String,
        /// Guest-physical address of the table.
        addr: u64,
        /// Table length in bytes.
        len: usize,
        /// Underlying guest memory error.
        #[source]
        source: GuestMemoryError,
    },
    /// Creating the dump directory failed.
    #[error("failed to create ACPI dump directory {path}: {source}")]
    CreateDumpDir {
        /// Directory that could not be created.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing a dump file failed.
    #[error("failed to write ACPI dump file {path}: {source}")]
    WriteDumpFile {
        /// File that could not be written.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: io::Error,
    },
}

/// What the ACPI tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// CPUs `0..boot_cpus` are marked Enabled in the MADT.
    pub boot_cpus: u32,
    /// Every CPU `0..max_cpus` is listed (those past `boot_cpus` as online-capable);
    /// at most [`layout::MAX_VCPUS`].
    pub max_cpus: u32,
    /// Number of PNP0C80 memory hotplug slots (0 = no memory hotplug, only an `MSCN` stub);
    /// at most [`layout::MAX_MEMORY_HOTPLUG_SLOTS`].
    pub memory_slots: usize,
    /// Whether the memory devices can be ejected (`_EJ0`): hot-added memory is removable.
    pub memory_removable: bool,
    /// Whether the DSDT describes the pvpanic device (`QEMU0001` at [`layout::ports::PVPANIC`]).
    pub pvpanic: bool,
    /// Number of virtio-mmio devices (`LNRO0005`), at most [`layout::MAX_VIRTIO_DEVICES`].
    pub virtio_devices: usize,
}

/// One table and where it goes in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    /// Table signature: "RSDP", "XSDT", "FACP", "APIC" or "DSDT".
    pub signature: String,
    /// Guest-physical address of the table.
    pub addr: u64,
    /// Complete table bytes, checksums included.
    pub bytes: Vec<u8>,
}

/// The complete set of tables for one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// The RSDP (signature "RSDP") at [`layout::RSDP_START`].
    pub rsdp: AcpiTable,
    /// Every other table, in ascending address order.
    pub tables: Vec<AcpiTable>,
}

impl AcpiTables {
    #[cfg(test)]
    /// The table with `signature` ("RSDP" included), if any.
    pub fn get(&self, signature: &str) -> Option<&AcpiTable> {
        std::iter::once(&self.rsdp)
            .chain(self.tables.iter())
            .find(|t| t.signature == signature)
    }
}

/// Serializes any AML object or table into a byte vector.
fn aml_bytes(obj: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    obj.to_aml_bytes(&mut bytes);
    bytes
}

/// Already-serialized AML, so built pieces can be nested into other AML objects.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Rounds `addr` up to [`TABLE_ALIGN`].
fn align_up(addr: u64) -> u64 {
    addr.div_ceil(TABLE_ALIGN) * TABLE_ALIGN
}

/// Checks the configuration before anything is built.
fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.boot_cpus == 0 {
        return Err(AcpiError::NoBootCpus);
    }
    if cfg.max_cpus > layout::MAX_VCPUS {
        return Err(AcpiError::TooManyCpus {
            max: cfg.max_cpus,
            limit: layout::MAX_VCPUS,
        });
    }
    if cfg.boot_cpus > cfg.max_cpus {
        return Err(AcpiError::BootCpusExceedMax {
            boot: cfg.boot_cpus,
            max: cfg.max_cpus,
        });
    }
    if cfg.memory_slots > layout::MAX_MEMORY_HOTPLUG_SLOTS {
        return Err(AcpiError::TooManyMemorySlots {
            slots: cfg.memory_slots,
            limit: layout::MAX_MEMORY_HOTPLUG_SLOTS,
        });
    }
    Ok(())
}

/// Builds every table and places them from [`layout::RSDP_START`] up to [`layout::ACPI_END`]
/// (error if they do not fit).
///
/// Layout: RSDP, then DSDT, MADT ("APIC"), FADT ("FACP") and XSDT, each 16-byte aligned, so
/// every table only points at tables placed before it.
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    validate(cfg)?;
    let (max_cpus, boot_cpus) = (
        madt::cpu_count(cfg.max_cpus)?,
        madt::cpu_count(cfg.boot_cpus)?,
    );

    let mut tables = Vec::with_capacity(4);
    let mut next = align_up(layout::RSDP_START + Rsdp::len() as u64);
    let mut place = |signature: &str, bytes: Vec<u8>| -> u64 {
        let addr = next;
        next = align_up(addr + bytes.len() as u64);
        tables.push(AcpiTable {
            signature: signature.to_string(),
            addr,
            bytes,
        });
        addr
    };

    let memory = dsdt::MemoryDevices {
        slots: cfg.memory_slots,
        ejectable: cfg.memory_removable,
    };
    let dsdt_addr = place(
        "DSDT",
        dsdt::build(
            max_cpus,
            memory,
            cfg.pvpanic,
            cfg.virtio_devices.min(layout::MAX_VIRTIO_DEVICES),
        ),
    );
    let madt_addr = place("APIC", madt::build(boot_cpus, max_cpus));
    let fadt_addr = place("FACP", fadt::build(dsdt_addr));
    let mut xsdt = XSDT::new(OEM_ID, *b"MVMXSDT ", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place("XSDT", aml_bytes(&xsdt));

    let end = tables
        .last()
        .map_or(layout::RSDP_START, |t| t.addr + t.bytes.len() as u64);
    if end > layout::ACPI_END {
        return Err(AcpiError::TooLarge {
            start: layout::RSDP_START,
            end,
            limit: layout::ACPI_END,
            size: end - layout::RSDP_START,
        });
    }

    let rsdp = AcpiTable {
        signature: "RSDP".to_string(),
        addr: layout::RSDP_START,
        bytes: aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
    };
    Ok(AcpiTables { rsdp, tables })
}

/// Writes the RSDP and all tables into guest memory at their addresses.
pub fn write(mem: &GuestMemoryMmap, tables: &AcpiTables) -> Result<(), AcpiError> {
    for table in std::iter::once(&tables.rsdp).chain(tables.tables.iter()) {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(|source| AcpiError::GuestMemoryWrite {
                signature: table.signature.clone(),
                addr: table.addr,
                len: table.bytes.len(),
                source,
            })?;
    }
    Ok(())
}

/// Writes `<SIGNATURE>.dat` files (RSDP.dat, XSDT.dat, FACP.dat, DSDT.dat, APIC.dat) into
/// `dir` (created if missing).
pub fn dump(dir: &Path, tables: &AcpiTables) -> Result<(), AcpiError> {
    std::fs::create_dir_all(dir).map_err(|source| AcpiError::CreateDumpDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for table in std::iter::once(&tables.rsdp).chain(tables.tables.iter()) {
        let path = dir.join(format!("{}.dat", table.signature));
        std::fs::write(&path, &table.bytes)
            .map_err(|source| AcpiError::WriteDumpFile { path, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
