//! `get_timezone` as the iana-time-zone crate has it, without CoreFoundation: the zone is the
//! part of the `/etc/localtime` link's target after `zoneinfo/` (Linux: `/usr/share/zoneinfo/`,
//! macOS: `/var/db/timezone/zoneinfo/`). chrono calls it only when it cannot read
//! `/etc/localtime` itself, and kubenet never asks for local time at all.

use std::fmt;

/// Why no zone was found (the real crate's variants, so that code matching on them compiles).
#[derive(Debug)]
pub enum GetTimezoneError {
    /// The link's target names no zone.
    FailedParsingString,
    /// The link could not be read.
    IoError(std::io::Error),
    /// Not raised here; kept for the real crate's API.
    OsError,
}

impl std::error::Error for GetTimezoneError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GetTimezoneError::IoError(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for GetTimezoneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GetTimezoneError::FailedParsingString => f.write_str("/etc/localtime names no time zone"),
            GetTimezoneError::IoError(e) => e.fmt(f),
            GetTimezoneError::OsError => f.write_str("the system gave no time zone"),
        }
    }
}

impl From<std::io::Error> for GetTimezoneError {
    fn from(e: std::io::Error) -> Self {
        GetTimezoneError::IoError(e)
    }
}

/// The IANA name of the system's time zone, e.g. "Europe/Berlin".
pub fn get_timezone() -> Result<String, GetTimezoneError> {
    let target = std::fs::read_link("/etc/localtime")?;
    zone_of(&target.to_string_lossy()).map(str::to_owned).ok_or(GetTimezoneError::FailedParsingString)
}

/// The zone in a link target: what follows its last `zoneinfo/`.
fn zone_of(target: &str) -> Option<&str> {
    let (_, zone) = target.rsplit_once("zoneinfo/")?;
    (!zone.is_empty()).then_some(zone)
}

#[cfg(test)]
mod tests {
    use super::zone_of;

    #[test]
    fn zone_from_linux_and_macos_links() {
        assert_eq!(zone_of("/usr/share/zoneinfo/Europe/Berlin"), Some("Europe/Berlin"));
        assert_eq!(zone_of("../usr/share/zoneinfo/Etc/UTC"), Some("Etc/UTC"));
        assert_eq!(zone_of("/var/db/timezone/zoneinfo/America/New_York"), Some("America/New_York"));
        assert_eq!(zone_of("/etc/zoneinfo/"), None);
        assert_eq!(zone_of("/somewhere/else"), None);
    }
}
