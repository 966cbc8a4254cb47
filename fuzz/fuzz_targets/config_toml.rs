//! `idem serve --config FILE`: the TOML config file, read and validated by
//! `ServeArgs::resolve` (the same path as the gateway's start-up).
//!
//! Input: the file's content. Checks that resolving never panics, whatever the file holds
//! (TOML syntax, unknown keys, wrong types, bad durations, sizes, methods, header names,
//! addresses and URLs), and that a config it accepts keeps the invariants the gateway relies
//! on.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use idem::config::ServeArgs;
use libfuzzer_sys::fuzz_target;

/// One file per fuzzing process, rewritten for each input.
static PATH: LazyLock<PathBuf> = LazyLock::new(|| {
    std::env::temp_dir().join(format!("idem-fuzz-config-{}.toml", std::process::id()))
});

fuzz_target!(|data: &[u8]| {
    if std::fs::write(&*PATH, data).is_err() {
        return;
    }
    let args = ServeArgs { config: Some(PATH.clone()), ..ServeArgs::default() };
    let Ok(config) = args.resolve() else { return };
    assert_eq!(config.upstream.scheme_str(), Some("http"));
    assert!(config.upstream.authority().is_some() && config.upstream.query().is_none());
    assert!(config.lease >= Duration::from_secs(1) && config.ttl >= Duration::from_secs(1));
    assert!(config.request_body_timeout >= Duration::from_secs(1));
    assert!(!config.sweep_interval.is_zero() && !config.upstream_timeout.is_zero());
    assert!(config.upstream_abandon_after >= config.upstream_timeout);
    assert!(config.max_request_body >= 1 && config.max_stored_body >= 1);
    assert!(config.max_stored_body <= u32::MAX as usize / 2);
    assert!(config.max_buffered_bodies >= config.max_request_body);
    assert!(config.request_body_min_rate >= 1 && config.max_connections >= 1);
    assert!(!config.methods.is_empty());
});
