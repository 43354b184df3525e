//! Logging setup, and the runtime log filter the admin API changes.

pub mod access;
pub mod metrics;
pub mod server;

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The reload handle of the installed filter; set once by [`init_logging`].
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Why a log filter could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    /// The process never installed remora's subscriber (an embedding program
    /// or a test that runs the proxy in-process).
    #[error("logging was not initialised by remora in this process; the log filter cannot be changed")]
    NotInitialised,
    #[error("invalid log filter {value:?}: {reason}")]
    Invalid { value: String, reason: String },
    #[error("cannot change the log filter: {0}")]
    Reload(String),
}

/// Installs the global subscriber on stderr. `level` is a level (`info`) or a
/// full filter directive (`info,remora::access=debug`); it can be replaced at
/// runtime with [`set_log_filter`].
pub fn init_logging(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = parse_filter(level).map_err(|e| format!("--log-level: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let (text, json) = match format {
        // Colours only on a terminal: log collectors store escape codes verbatim.
        LogFormat::Text => {
            (Some(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr)), None)
        }
        LogFormat::Json => (None, Some(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr))),
    };
    tracing_subscriber::registry().with(filter).with(text).with(json).try_init().map_err(|e| e.to_string())?;
    // `try_init` succeeded, so this is the first and only subscriber; the
    // handle cannot have been set before.
    let _ = FILTER.set(handle);
    Ok(())
}

/// Parses a log filter. A single word must be a level (`trace`, `debug`,
/// `info`, `warn`, `error`, `off`; Envoy's `warning` and `critical` are
/// accepted too): `EnvFilter` would read any other word as a target name and
/// silently turn every other log line off.
pub fn parse_filter(spec: &str) -> Result<EnvFilter, LogFilterError> {
    let spec = spec.trim();
    let invalid = |reason: String| LogFilterError::Invalid { value: spec.to_string(), reason };
    if spec.is_empty() {
        return Err(invalid(
            "empty; give a level (info, debug, ...) or a filter like info,remora::access=debug".into(),
        ));
    }
    let spec = if spec.contains(['=', ',', '[']) {
        spec.to_string()
    } else {
        let word = match spec.to_ascii_lowercase().as_str() {
            "warning" => "warn".to_string(),
            "critical" => "error".to_string(),
            other => other.to_string(),
        };
        word.parse::<LevelFilter>().map_err(|_| {
            invalid("not a level (trace, debug, info, warn, error, off); a target needs a level: TARGET=LEVEL".into())
        })?;
        word
    };
    EnvFilter::builder().parse(&spec).map_err(|e| invalid(e.to_string()))
}

/// The filter in effect, as `EnvFilter` prints it.
pub fn log_filter() -> Result<String, LogFilterError> {
    let handle = FILTER.get().ok_or(LogFilterError::NotInitialised)?;
    handle.with_current(|f| f.to_string()).map_err(|e| LogFilterError::Reload(e.to_string()))
}

/// Replaces the filter; returns the new filter as it prints. A value that
/// does not parse is refused whether or not logging was initialised.
pub fn set_log_filter(spec: &str) -> Result<String, LogFilterError> {
    let filter = parse_filter(spec)?;
    let handle = FILTER.get().ok_or(LogFilterError::NotInitialised)?;
    let shown = filter.to_string();
    handle.reload(filter).map_err(|e| LogFilterError::Reload(e.to_string()))?;
    tracing::info!(filter = %shown, "log filter changed");
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_parse_and_bare_words_must_be_levels() {
        for ok in ["info", "DEBUG", "warning", "critical", "off", "info,remora::access=debug", "remora=trace"] {
            assert!(parse_filter(ok).is_ok(), "{ok}");
        }
        assert_eq!(parse_filter("warning").map(|f| f.to_string()).ok().as_deref(), Some("warn"));
        for bad in ["", "  ", "verbose", "info,remora=loud"] {
            assert!(matches!(parse_filter(bad), Err(LogFilterError::Invalid { .. })), "{bad:?}");
        }
    }

    #[test]
    fn without_init_the_filter_is_reported_as_not_initialised() {
        // Unit tests never call `init_logging`.
        assert!(matches!(log_filter(), Err(LogFilterError::NotInitialised)));
        assert!(matches!(set_log_filter("debug"), Err(LogFilterError::NotInitialised)));
    }
}
