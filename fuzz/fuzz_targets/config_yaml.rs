//! The YAML config loader: any bytes as a config file, then the whole-config
//! check every proxy's translation runs. Errors are fine; panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sources = vec![("fuzz.yaml".to_string(), text.to_string())];
    if let Ok(cfg) = bosun_control::load::load_sources(&sources) {
        let _ = bosun_control::translate::check(&cfg);
    }
});
