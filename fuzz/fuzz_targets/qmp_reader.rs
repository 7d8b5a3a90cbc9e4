//! Arbitrary bytes as what a QMP peer sends, line by line as the reader splits it: each line
//! is a message or an error, never a panic; an answer goes on to the disk lookup live
//! snapshots make of `query-block`'s answer.
#![no_main]

use kubenet_vm::qmp::{Message, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|b| *b == b'\n') {
        if let Ok(Message::Return(v)) = parse(line) {
            let _ = kubenet_vm::live::disk_node(&v);
        }
    }
});
