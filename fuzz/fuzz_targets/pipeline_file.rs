//! The pipeline file parser on arbitrary text: a file is valid or a list of
//! diagnostics, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match etlmesh_config::PipelineFile::parse("fuzz.yaml", text) {
            Ok(f) => assert!(!f.spec.pipelines.is_empty()),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
