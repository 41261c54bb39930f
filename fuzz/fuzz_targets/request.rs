#![no_main]
//! The request side of `Ledger::verify` on a small in-memory ledger, against a reference.
libfuzzer_sys::fuzz_target!(|data: &[u8]| keyledger::fuzzing::request(data));
