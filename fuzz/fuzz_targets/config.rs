//! Arbitrary text as a lab definition: parsing and validation must end in a lab or in located
//! problems, never a panic; a problem's line must exist in the text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match kubenet_cluster::parse(text, kubenet_cluster::Source::Embedded, "/".as_ref()) {
        Ok(lab) => assert!(!lab.vms.is_empty()),
        Err(e) => {
            let lines = text.lines().count().max(1);
            for p in e.problems() {
                assert!(p.line <= lines + 1, "problem at line {} of a {lines}-line file: {p:?}", p.line);
            }
        }
    }
});
