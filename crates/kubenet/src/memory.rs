//! Letting go of start-up's code once `serve` is ready.
//!
//! Start-up (the command line, the lab definition, the servers' set-up) runs code that `serve`
//! never runs again, and the kernel maps code in 64 KB windows around each page touched, so
//! those pages stay in the agent's memory (RSS) for as long as it runs. Once every port is
//! bound, [`shed_start_up_pages`] unmaps the pages of its binary and its shared libraries that
//! hold nothing but the files' own bytes; the pages `serve` then runs come back at once from the
//! page cache, as minor faults, without touching the disk.
//!
//! Only read-only file mappings with no private page (smaps' `Anonymous: 0 kB`) are touched:
//! for those, MADV_DONTNEED drops nothing but the mapping, exactly what the kernel itself does
//! to them under memory pressure. Relocated data (RELRO) and every writable mapping keep theirs.

use std::ops::Range;

/// Unmaps the clean pages of the process's code and read-only data (see the module's header);
/// returns how many bytes of mappings it advised. Linux only: elsewhere it does nothing.
pub fn shed_start_up_pages() -> std::io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        let exe = std::fs::read_link("/proc/self/exe")?;
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut advised = 0;
        for r in clean_code_mappings(&smaps, &exe.to_string_lossy()) {
            // SAFETY: `r` is a whole mapping of a file, read-only and without private pages, so
            // MADV_DONTNEED only removes page-table entries; the next access maps the same bytes
            // back from the page cache. No memory the program wrote is discarded.
            let rc = unsafe { libc::madvise(r.start as *mut libc::c_void, r.len(), libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            advised += r.len();
        }
        Ok(advised)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(0)
}

/// The address ranges, from `/proc/PID/smaps` text, of the mappings of the executable `exe`
/// or of a shared library (a file whose name has `.so`) that are not writable and hold no
/// private (anonymous) page. Pure.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub fn clean_code_mappings(smaps: &str, exe: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut current: Option<Range<usize>> = None;
    for line in smaps.lines() {
        if let Some((range, perms, path)) = header(line) {
            current = None;
            let library = path.starts_with('/') && path.rsplit('/').next().is_some_and(|name| name.contains(".so"));
            if (path == exe || library) && !perms.contains('w') {
                current = Some(range);
            }
        } else if let Some(kb) = line.strip_prefix("Anonymous:") {
            let anonymous = kb.trim().trim_end_matches("kB").trim() != "0";
            if let Some(r) = current.take().filter(|_| !anonymous) {
                out.push(r);
            }
        }
    }
    out
}

/// A mapping's header line: `START-END PERMS OFFSET DEV INODE [PATH]`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn header(line: &str) -> Option<(Range<usize>, &str, &str)> {
    let mut f = line.splitn(6, ' ');
    let (start, end) = f.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = f.next()?;
    if perms.len() != 4 {
        return None;
    }
    let path = f.nth(3).unwrap_or("").trim_start();
    Some((start..end, perms, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5600000000-5600100000 r--p 00000000 fe:01 123 /usr/bin/kubenet
Size:               1024 kB
Rss:                 600 kB
Anonymous:             0 kB
5600100000-5600200000 r-xp 00100000 fe:01 123 /usr/bin/kubenet
Rss:                 900 kB
Anonymous:             0 kB
5600200000-5600210000 r--p 00200000 fe:01 123 /usr/bin/kubenet
Rss:                  64 kB
Anonymous:            64 kB
5600210000-5600220000 rw-p 00210000 fe:01 123 /usr/bin/kubenet
Anonymous:            20 kB
5600220000-5600240000 rw-p 00000000 00:00 0                          [heap]
Anonymous:           100 kB
7f0000000000-7f0000010000 r--p 00000000 fe:01 77 /usr/share/locale/locale-archive
Anonymous:             0 kB
7f0000100000-7f0000200000 r-xp 00028000 fe:01 88 /usr/lib/x86_64-linux-gnu/libc.so.6
VmFlags: rd ex mr mw me
Anonymous:             0 kB
7f0000200000-7f0000204000 r--p 001d0000 fe:01 88 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             4 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_the_program_and_its_libraries_are_chosen() {
        assert_eq!(
            clean_code_mappings(SMAPS, "/usr/bin/kubenet"),
            [0x5600000000..0x5600100000, 0x5600100000..0x5600200000, 0x7f0000100000..0x7f0000200000]
        );
    }

    #[test]
    fn a_mapping_without_an_anonymous_line_is_left_alone() {
        let text = "5600000000-5600100000 r-xp 00000000 fe:01 123 /usr/bin/kubenet\nRss: 4 kB\n\
                    5600100000-5600200000 r--p 00100000 fe:01 123 /usr/bin/kubenet\nAnonymous: 0 kB\n";
        assert_eq!(clean_code_mappings(text, "/usr/bin/kubenet"), vec![0x5600100000..0x5600200000]);
        assert!(clean_code_mappings(text, "/usr/bin/other").is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn shedding_keeps_the_program_running_and_its_data_intact() {
        let data: Vec<u64> = (0..100_000).collect();
        let advised = shed_start_up_pages().unwrap();
        assert!(advised > 0, "the test binary's own code is a clean mapping");
        // Code and read-only data come back from the page cache; the heap was never touched.
        assert_eq!(data.iter().sum::<u64>(), 99_999 * 100_000 / 2);
        assert_eq!(format!("{:?}", Some("still here")), "Some(\"still here\")");
    }
}
