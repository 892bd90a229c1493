//! CMOS real-time clock (MC146818-compatible) at ports 0x70 (index) / 0x71 (data).
//!
//! The guest kernel reads the wall-clock time at boot; without an RTC it waits several seconds
//! for one. Time registers are computed from an injected clock on every read, in BCD unless the
//! guest set the binary-mode bit (DM) in status register B, and in 24-hour mode unless the guest
//! cleared the 24/12 bit. Guest writes to the time registers are ignored: the guest cannot set
//! the host's clock. All other indexes below 128 are plain CMOS RAM.

use super::{BusDevice, DeviceEvent};

/// Offset of the index port (0x70).
const INDEX_PORT: u64 = 0;
/// Offset of the data port (0x71).
const DATA_PORT: u64 = 1;
/// Size of the CMOS RAM, including the clock registers.
const CMOS_SIZE: usize = 128;
/// Index bit 7 disables NMIs on real hardware; it is not part of the index.
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Status A: update in progress (always reported clear).
const A_UIP: u8 = 0x80;
/// Status A after reset: 32.768 kHz time base, 1024 Hz periodic rate.
const A_DEFAULT: u8 = 0x26;
/// Status B: binary (not BCD) data mode.
const B_DM: u8 = 0x04;
/// Status B: 24-hour mode.
const B_24H: u8 = 0x02;
/// Status D: valid RAM and time.
const D_VRT: u8 = 0x80;
/// Hours register bit marking PM in 12-hour mode.
const HOURS_PM: u8 = 0x80;

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday ... 7 = Saturday.
    weekday: u8,
}

impl DateTime {
    /// Converts seconds since the Unix epoch to a proleptic Gregorian UTC date and time.
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let secs_of_day = secs.rem_euclid(86_400);
        // Shift the epoch to 0000-03-01 so leap days fall at the end of a 400-year era.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let day_of_era = z.rem_euclid(146_097);
        let year_of_era =
            (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let month_from_march = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
        let month = if month_from_march < 10 {
            month_from_march + 3
        } else {
            month_from_march - 9
        };
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        // 1970-01-01 was a Thursday (5 with Sunday = 1).
        let weekday = (days + 4).rem_euclid(7) + 1;
        // All narrowed values are bounded by the arithmetic above (< 60, < 24, <= 31, ...).
        Self {
            year,
            month: month as u8,
            day: day as u8,
            hour: (secs_of_day / 3_600) as u8,
            minute: (secs_of_day / 60 % 60) as u8,
            second: (secs_of_day % 60) as u8,
            weekday: weekday as u8,
        }
    }
}

/// Encodes a value below 100 in BCD.
fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// The CMOS RTC device (len 2: index and data ports).
pub struct Rtc {
    clock: fn() -> i64,
    index: u8,
    cmos: [u8; CMOS_SIZE],
}

impl std::fmt::Debug for Rtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rtc").field("index", &self.index).finish()
    }
}

/// Seconds since the Unix epoch from the host's real-time clock (0 if it is before 1970).
fn system_clock() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Rtc {
    /// Creates an RTC whose time comes from `clock` (Unix seconds, UTC).
    pub fn new(clock: fn() -> i64) -> Self {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_24H;
        Self {
            clock,
            index: 0,
            cmos,
        }
    }

    /// Creates an RTC that reads the host's real-time clock.
    pub fn with_system_clock() -> Self {
        Self::new(system_clock)
    }

    /// Encodes a time field according to the data mode in status B.
    fn encode(&self, value: u8) -> u8 {
        if self.cmos[usize::from(REG_B)] & B_DM != 0 {
            value
        } else {
            to_bcd(value)
        }
    }

    /// Value of the CMOS register at `index` (< 128).
    fn read_register(&self, index: u8) -> u8 {
        let time = || DateTime::from_unix((self.clock)());
        match index {
            REG_SECONDS => self.encode(time().second),
            REG_MINUTES => self.encode(time().minute),
            REG_HOURS => {
                let hour = time().hour;
                if self.cmos[usize::from(REG_B)] & B_24H != 0 {
                    self.encode(hour)
                } else {
                    let pm = if hour >= 12 { HOURS_PM } else { 0 };
                    let hour12 = match hour % 12 {
                        0 => 12,
                        h => h,
                    };
                    self.encode(hour12) | pm
                }
            }
            REG_WEEKDAY => self.encode(time().weekday),
            REG_DAY => self.encode(time().day),
            REG_MONTH => self.encode(time().month),
            // rem_euclid keeps both in 0..100 (years outside 0..9999 wrap).
            REG_YEAR => self.encode(time().year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode((time().year / 100).rem_euclid(100) as u8),
            REG_A => self.cmos[usize::from(REG_A)] & !A_UIP,
            REG_C => 0,
            REG_D => D_VRT,
            _ => self.cmos.get(usize::from(index)).copied().unwrap_or(0),
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                log::debug!("RTC: ignoring guest write {value:#x} to time register {index:#x}");
            }
            REG_C | REG_D => {}
            _ => {
                if let Some(byte) = self.cmos.get_mut(usize::from(index)) {
                    *byte = value;
                }
            }
        }
    }
}

impl BusDevice for Rtc {
    /// The data port reads the selected register; the index port reads 0. Only the first byte
    /// of an access is served; the rest reads 0.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == DATA_PORT {
            if let Some(byte) = data.first_mut() {
                *byte = self.read_register(self.index);
            }
        }
    }

    /// The index port selects a register (bit 7 ignored); the data port writes it. Only the
    /// first byte of an access counts.
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceEvent {
        if let Some(&value) = data.first() {
            match offset {
                INDEX_PORT => self.index = value & INDEX_MASK,
                DATA_PORT => self.write_register(self.index, value),
                _ => {}
            }
        }
        DeviceEvent::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-02-29 (a Thursday) 13:05:09 UTC.
    fn fixed_clock() -> i64 {
        1_709_211_909
    }

    fn read_reg(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(INDEX_PORT, &[index]);
        let mut data = [0xffu8];
        rtc.read(DATA_PORT, &mut data);
        data[0]
    }

    fn write_reg(rtc: &mut Rtc, index: u8, value: u8) {
        rtc.write(INDEX_PORT, &[index]);
        rtc.write(DATA_PORT, &[value]);
    }

    #[test]
    fn date_conversion() {
        let epoch = DateTime::from_unix(0);
        assert_eq!(
            epoch,
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        let leap = DateTime::from_unix(fixed_clock());
        assert_eq!((leap.year, leap.month, leap.day), (2024, 2, 29));
        assert_eq!((leap.hour, leap.minute, leap.second), (13, 5, 9));
        assert_eq!(leap.weekday, 5);
        // 2000-03-01 00:00:00 was a Wednesday (4); 1999-12-31 23:59:59 a Friday (6).
        let d = DateTime::from_unix(951_868_800);
        assert_eq!((d.year, d.month, d.day, d.weekday), (2000, 3, 1, 4));
        let d = DateTime::from_unix(946_684_799);
        assert_eq!(
            (d.year, d.month, d.day, d.hour, d.weekday),
            (1999, 12, 31, 23, 6)
        );
        // Before the epoch: 1969-12-31 23:59:59, a Wednesday.
        let d = DateTime::from_unix(-1);
        assert_eq!(
            (d.year, d.month, d.day, d.second, d.weekday),
            (1969, 12, 31, 59, 4)
        );
    }

    #[test]
    fn bcd_time_at_fixed_clock() {
        let mut rtc = Rtc::new(fixed_clock);
        assert_eq!(read_reg(&mut rtc, REG_SECONDS), 0x09);
        assert_eq!(read_reg(&mut rtc, REG_MINUTES), 0x05);
        assert_eq!(read_reg(&mut rtc, REG_HOURS), 0x13);
        assert_eq!(read_reg(&mut rtc, REG_WEEKDAY), 0x05);
        assert_eq!(read_reg(&mut rtc, REG_DAY), 0x29);
        assert_eq!(read_reg(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(read_reg(&mut rtc, REG_YEAR), 0x24);
        assert_eq!(read_reg(&mut rtc, REG_CENTURY), 0x20);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut rtc = Rtc::new(fixed_clock);
        write_reg(&mut rtc, REG_B, B_24H | B_DM);
        assert_eq!(read_reg(&mut rtc, REG_B), B_24H | B_DM);
        assert_eq!(read_reg(&mut rtc, REG_HOURS), 13);
        assert_eq!(read_reg(&mut rtc, REG_DAY), 29);
        assert_eq!(read_reg(&mut rtc, REG_CENTURY), 20);
        // 12-hour BCD: 1 PM.
        write_reg(&mut rtc, REG_B, 0);
        assert_eq!(read_reg(&mut rtc, REG_HOURS), HOURS_PM | 0x01);
        // 12-hour at midnight reads 12 AM.
        let mut midnight = Rtc::new(|| 0);
        write_reg(&mut midnight, REG_B, 0);
        assert_eq!(read_reg(&mut midnight, REG_HOURS), 0x12);
    }

    #[test]
    fn status_registers() {
        let mut rtc = Rtc::new(fixed_clock);
        assert_eq!(read_reg(&mut rtc, REG_A), A_DEFAULT);
        assert_eq!(read_reg(&mut rtc, REG_B), B_24H);
        assert_eq!(read_reg(&mut rtc, REG_C), 0);
        assert_eq!(read_reg(&mut rtc, REG_D), D_VRT);
        // UIP never reads as set; C and D ignore writes.
        write_reg(&mut rtc, REG_A, 0xa6);
        assert_eq!(read_reg(&mut rtc, REG_A), 0x26);
        write_reg(&mut rtc, REG_C, 0xff);
        write_reg(&mut rtc, REG_D, 0);
        assert_eq!(read_reg(&mut rtc, REG_C), 0);
        assert_eq!(read_reg(&mut rtc, REG_D), D_VRT);
    }

    #[test]
    fn cmos_ram_and_index_masking() {
        let mut rtc = Rtc::new(fixed_clock);
        write_reg(&mut rtc, 0x40, 0xab);
        assert_eq!(read_reg(&mut rtc, 0x40), 0xab);
        // NMI-disable bit is not part of the index.
        assert_eq!(read_reg(&mut rtc, 0x80 | 0x40), 0xab);
        write_reg(&mut rtc, 0x7f, 0x11);
        assert_eq!(read_reg(&mut rtc, 0xff), 0x11);
        // Time registers ignore writes.
        write_reg(&mut rtc, REG_SECONDS, 0x59);
        assert_eq!(read_reg(&mut rtc, REG_SECONDS), 0x09);
        // The index port reads 0; extra bytes of a wide access read 0.
        let mut data = [0xffu8; 2];
        rtc.read(INDEX_PORT, &mut data);
        assert_eq!(data, [0, 0]);
        rtc.write(INDEX_PORT, &[REG_DAY]);
        rtc.read(DATA_PORT, &mut data[..1]);
        assert_eq!(data[0], 0x29);
    }

    #[test]
    fn system_clock_is_after_2020() {
        let mut rtc = Rtc::with_system_clock();
        assert!(read_reg(&mut rtc, REG_CENTURY) >= 0x20);
        assert!(system_clock() > 1_577_836_800);
    }
}
