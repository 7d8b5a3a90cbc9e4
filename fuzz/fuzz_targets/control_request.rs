//! Arbitrary bytes as a control-socket request line, decoded and validated as the agent does
//! before it acts: an error answer or a request within range, never a panic. What decodes
//! passed validation, and reads back to itself from its own encoding.
#![no_main]

use kubenet::proto::{decode_request, encode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = decode_request(data) else { return };
    assert_eq!(req.validate(), Ok(()));
    assert_eq!(decode_request(encode_request(&req).as_bytes()), Ok(req));
});
