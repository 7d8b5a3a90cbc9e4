//! Sizes and durations as users write them in the config. Pure parsing, no I/O.
//!
//! Sizes follow QEMU's convention (`-m 2G`, `qemu-img create ... 20G`): every unit is a power of
//! 1024, so "2G", "2GB" and "2GiB" all mean 2 GiB. Durations follow dnsmasq's lease times
//! ("12h", "30m", "infinite") through humantime.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

/// A byte count, e.g. guest memory or a disk size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl Bytes {
    pub const MIB: u64 = 1 << 20;
    pub const GIB: u64 = 1 << 30;

    /// Whole mebibytes, rounded down: what QEMU's `-m` takes.
    pub fn mib(self) -> u64 {
        self.0 / Self::MIB
    }
}

impl std::str::FromStr for Bytes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size: expected a whole number with a unit, e.g. \"2G\", \"512M\""))?;
        let shift = match unit.trim().to_ascii_uppercase().as_str() {
            // QEMU reads a bare `-m 2048` as MiB and qemu-img a bare size as bytes: a bare
            // number here would surprise one of them, so it must say which.
            "" => {
                return Err(format!(
                    "`{s}` has no unit: write e.g. \"{n}M\" or \"{n}G\" (QEMU's -m {n} would mean MiB, qemu-img's {n} bytes)"
                ));
            }
            "B" => 0,
            "K" | "KB" | "KIB" => 10,
            "M" | "MB" | "MIB" => 20,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(format!("`{s}` has an unknown size unit `{unit}`: use K, M, G or T")),
        };
        n.checked_mul(1u64 << shift).map(Bytes).ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl fmt::Display for Bytes {
    /// The shortest exact form: "2GiB", "512MiB", "1536MiB".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// How long a DHCP lease lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseTime {
    Finite(Duration),
    Infinite,
}

impl LeaseTime {
    /// Seconds as DHCP option 51 carries them: 0xffffffff means infinite (RFC 2131 3.3).
    pub fn as_secs_u32(self) -> u32 {
        match self {
            LeaseTime::Infinite => u32::MAX,
            LeaseTime::Finite(d) => d.as_secs().min(u64::from(u32::MAX - 1)) as u32,
        }
    }
}

impl std::str::FromStr for LeaseTime {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("infinite") {
            return Ok(LeaseTime::Infinite);
        }
        let d = parse_duration(s)?;
        // RFC 2131 gives no lower bound, but dnsmasq refuses leases under 2 minutes: a shorter
        // one makes clients renew in a tight loop.
        if d < Duration::from_secs(120) {
            return Err(format!("`{s}` is too short for a lease: use at least 2m"));
        }
        Ok(LeaseTime::Finite(d))
    }
}

impl fmt::Display for LeaseTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseTime::Infinite => f.write_str("infinite"),
            LeaseTime::Finite(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl Serialize for LeaseTime {
    /// Seconds, or the string "infinite".
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LeaseTime::Infinite => s.serialize_str("infinite"),
            LeaseTime::Finite(d) => s.serialize_u64(d.as_secs()),
        }
    }
}

/// "12h", "30m", "1d 6h", "90s"; a bare number is refused because its unit would be a guess.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}): write e.g. \"12h\", \"30m\", \"90s\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units_like_qemu() {
        assert_eq!("2G".parse::<Bytes>(), Ok(Bytes(2 << 30)));
        assert_eq!("8GiB".parse::<Bytes>(), Ok(Bytes(8 << 30)));
        assert_eq!("512M".parse::<Bytes>(), Ok(Bytes(512 << 20)));
        assert_eq!("20gb".parse::<Bytes>(), Ok(Bytes(20 << 30)));
        assert_eq!("4096B".parse::<Bytes>(), Ok(Bytes(4096)));
        // A bare number is refused: QEMU and qemu-img would read it differently.
        assert!("4096".parse::<Bytes>().unwrap_err().contains("no unit"));
        assert_eq!(Bytes(2 << 30).to_string(), "2GiB");
        assert_eq!(Bytes(1536 << 20).to_string(), "1536MiB");
    }

    #[test]
    fn bad_sizes_say_why() {
        assert!("2X".parse::<Bytes>().unwrap_err().contains("unknown size unit"));
        assert!("G".parse::<Bytes>().unwrap_err().contains("not a size"));
        assert!("-1G".parse::<Bytes>().is_err());
        assert!("99999999999T".parse::<Bytes>().unwrap_err().contains("too large"));
    }

    #[test]
    fn lease_times() {
        assert_eq!("12h".parse(), Ok(LeaseTime::Finite(Duration::from_secs(43200))));
        assert_eq!("30m".parse(), Ok(LeaseTime::Finite(Duration::from_secs(1800))));
        assert_eq!("infinite".parse::<LeaseTime>(), Ok(LeaseTime::Infinite));
        assert_eq!("INFINITE".parse::<LeaseTime>(), Ok(LeaseTime::Infinite));
        assert!("12".parse::<LeaseTime>().is_err());
        assert!("soon".parse::<LeaseTime>().is_err());
        assert!("30s".parse::<LeaseTime>().unwrap_err().contains("too short"));
        assert_eq!(LeaseTime::Infinite.as_secs_u32(), u32::MAX);
        assert_eq!("12h".parse::<LeaseTime>().unwrap().as_secs_u32(), 43200);
    }
}
