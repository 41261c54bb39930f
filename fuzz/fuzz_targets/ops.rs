#![no_main]
//! Operation sequences on the crash-simulating storage backend, checked against a model.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyledger::fuzzing::ops(data));
