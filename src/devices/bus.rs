//! Address-range dispatch of guest PIO/MMIO accesses to devices.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::{BusDevice, DeviceEvent};

/// Errors from building a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A device range of length zero was inserted.
    #[error("bus insert at {base:#x}: zero-length range")]
    ZeroLength {
        /// Base address of the rejected range.
        base: u64,
    },
    /// The range `base..base + len` wraps around the end of the address space.
    #[error("bus insert at {base:#x}: length {len:#x} overflows the address space")]
    Overflow {
        /// Base address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The new range overlaps a range already on the bus.
    #[error(
        "bus insert of {base:#x}+{len:#x}: overlaps the device at {existing_base:#x}+{existing_len:#x}"
    )]
    Overlap {
        /// Base address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base address of the device already there.
        existing_base: u64,
        /// Length of the device already there.
        existing_len: u64,
    },
}

struct BusRange {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each served by one device.
///
/// The bus itself is immutable once built and is shared by all vCPU threads (`Arc<Bus>`); the
/// devices sit behind their own mutexes. A poisoned device mutex is used as is rather than
/// propagating the panic of another thread.
#[derive(Default)]
pub struct Bus {
    /// Sorted by `base`; ranges never overlap.
    ranges: Vec<BusRange>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.ranges
                    .iter()
                    .map(|r| format!("{:#x}+{:#x}", r.base, r.len)),
            )
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` to serve `base..base + len`.
    ///
    /// Fails if `len` is zero, the range wraps past `u64::MAX`, or it overlaps a device already
    /// on the bus. The same device may be inserted at several ranges.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        // The last byte must be addressable; `base + len` itself may be 2^64.
        if base.checked_add(len - 1).is_none() {
            return Err(BusError::Overflow { base, len });
        }
        let idx = self.ranges.partition_point(|r| r.base < base);
        let overlapping = [idx.checked_sub(1), Some(idx)]
            .into_iter()
            .flatten()
            .filter_map(|i| self.ranges.get(i))
            .find(|r| r.base <= base + (len - 1) && base <= r.base + (r.len - 1));
        if let Some(r) = overlapping {
            return Err(BusError::Overlap {
                base,
                len,
                existing_base: r.base,
                existing_len: r.len,
            });
        }
        self.ranges.insert(idx, BusRange { base, len, dev });
        Ok(())
    }

    /// Finds the device fully covering `addr..addr + size` and the offset of `addr` in it.
    fn lookup(&self, addr: u64, size: usize) -> Option<(&BusRange, u64)> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let range = self.ranges.get(idx)?;
        let offset = addr - range.base;
        let end = offset.checked_add(u64::try_from(size).ok()?)?;
        (end <= range.len && offset < range.len).then_some((range, offset))
    }

    /// Fills `data` from the device covering `addr`.
    ///
    /// Returns false, with `data` zero-filled, when no device covers the whole access (no device
    /// there, or the access straddles the end of a device).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((range, offset)) => {
                let mut dev = super::lock(&range.dev);
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0);
                false
            }
        }
    }

    /// Passes a write to the device covering `addr`.
    ///
    /// Returns None when no device covers the whole access (no device there, or the access
    /// straddles the end of a device).
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<DeviceEvent> {
        let (range, offset) = self.lookup(addr, data.len())?;
        let mut dev = super::lock(&range.dev);
        Some(dev.write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with `offset + i`.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }

        fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
            self.last_write = Some((offset, data.to_vec()));
            DeviceEvent::Reset(crate::devices::ResetCause::Keyboard)
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn insert_rejects_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, probe()).unwrap();
        assert_eq!(
            bus.insert(0x200, 0, probe()),
            Err(BusError::ZeroLength { base: 0x200 })
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, probe()),
            Err(BusError::Overflow { .. })
        ));
        // Ending exactly at the top of the address space is fine.
        bus.insert(u64::MAX, 1, probe()).unwrap();
        for (base, len) in [
            (0x100, 1),
            (0x10f, 1),
            (0xf0, 0x11),
            (0x108, 0x100),
            (0, 0x1000),
        ] {
            assert_eq!(
                bus.insert(base, len, probe()),
                Err(BusError::Overlap {
                    base,
                    len,
                    existing_base: 0x100,
                    existing_len: 0x10
                }),
                "{base:#x}+{len:#x}"
            );
        }
        // Adjacent ranges on both sides are accepted.
        bus.insert(0xf0, 0x10, probe()).unwrap();
        bus.insert(0x110, 0x10, probe()).unwrap();
        assert_eq!(bus.ranges.len(), 4);
        assert!(bus.ranges.windows(2).all(|w| w[0].base < w[1].base));
    }

    #[test]
    fn dispatches_with_device_relative_offsets() {
        let mut bus = Bus::new();
        let a = probe();
        let b = probe();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 5, b.clone()).unwrap();

        let mut data = [0u8; 2];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2, 3]);

        assert_eq!(
            bus.write(0x64, &[0xfe]),
            Some(DeviceEvent::Reset(crate::devices::ResetCause::Keyboard))
        );
        assert_eq!(b.lock().unwrap().last_write, Some((4, vec![0xfe])));
        assert!(a.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unhandled_accesses() {
        let mut bus = Bus::new();
        bus.insert(0x100, 4, probe()).unwrap();
        let mut data = [0xaau8; 2];
        // Nothing there.
        assert!(!bus.read(0xff, &mut data));
        assert_eq!(data, [0, 0]);
        assert!(!bus.read(0x104, &mut data));
        assert_eq!(bus.write(0x50, &[1]), None);
        // Straddling the end of the device.
        data = [0xaa; 2];
        assert!(!bus.read(0x103, &mut data));
        assert_eq!(data, [0, 0]);
        assert_eq!(bus.write(0x103, &[1, 2]), None);
        // The last byte is still handled.
        assert!(bus.read(0x103, &mut data[..1]));
    }

    #[test]
    fn poisoned_device_mutex_still_serves() {
        let mut bus = Bus::new();
        let dev = probe();
        bus.insert(0x10, 1, dev.clone()).unwrap();
        let poisoner = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison the device mutex");
        })
        .join();
        assert!(dev.is_poisoned());
        assert_eq!(
            bus.write(0x10, &[7]),
            Some(DeviceEvent::Reset(crate::devices::ResetCause::Keyboard))
        );
        let mut data = [0u8; 1];
        assert!(bus.read(0x10, &mut data));
    }
}
