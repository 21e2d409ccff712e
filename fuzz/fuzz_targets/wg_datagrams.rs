#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = veilnet::fuzzing::wg_datagrams(data);
});
