#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = veilnet::fuzzing::flow_lines(data);
});
