#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry::fuzzing::sif_and_squashfs(data));
