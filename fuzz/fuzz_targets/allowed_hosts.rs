#![no_main]
//! Allowed-host patterns and the url check before a secret is attached, against a reference.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyledger::fuzzing::allowed_hosts(data));
