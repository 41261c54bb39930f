#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyledger::fuzzing::decode_public_id(data));
