//! Arbitrary bytes as the lease file, which lives in the lab owner's directory and is parsed by
//! root: parsing must never panic, and the table it gives must write out and read back whole.
#![no_main]

use kubenet_dhcp::LeaseTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = 1_700_000_000;
    let (table, bad) = LeaseTable::from_bytes(data, now);
    assert!(bad <= data.split(|b| *b == b'\n').count());
    let (again, bad) = LeaseTable::from_text(&table.to_text(), now);
    assert_eq!(bad, 0, "a line kubenet wrote does not parse");
    assert_eq!(again.len(), table.len());
});
