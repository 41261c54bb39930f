#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyledger::fuzzing::parse_key(data));
