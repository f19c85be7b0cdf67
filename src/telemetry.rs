//! Logging: JSON records on stderr (tracing-subscriber), filtered by
//! `RUST_LOG` (default `info`). One record per scaler poll carries
//! `loop_name: "scaler"`, `unclaimed_tasks`, `running_tasks`, `desired_vms`,
//! `pool` and `namespace`, like CircleCI's Runner Provisioner.
//!
//! Secrets never reach a log record: tokens are wrapped in types whose
//! `Debug` redacts them, and no code formats a Secret's data.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (default).
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// The filter: `RUST_LOG` if set and valid, else `default`.
pub fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// Installs the global subscriber writing to stderr. Returns false if one was
/// already installed (e.g. by a test), which is not an error.
pub fn init(format: LogFormat) -> bool {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter("info"))
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE)
        .with_target(true);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
            .is_ok(),
        LogFormat::Text => builder.try_init().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The JSON layout the scaler's poll record relies on: flat fields, one
    /// object per line.
    #[test]
    fn json_records_are_flat_objects() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("info"))
            .with_writer(move || w.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(
                loop_name = "scaler",
                unclaimed_tasks = 4u32,
                running_tasks = 2u32,
                desired_vms = 6u32,
                pool = "p",
                namespace = "ns",
                "poll"
            );
            tracing::debug!("filtered out");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["loop_name"], "scaler");
        assert_eq!(v["unclaimed_tasks"], 4);
        assert_eq!(v["running_tasks"], 2);
        assert_eq!(v["desired_vms"], 6);
        assert_eq!(v["message"], "poll");
        assert_eq!(v["level"], "INFO");
    }
}
