//! Failpoints: faults injected inside the code, for the robustness harness
//! (docs/robustness.md, "Failpoints").
//!
//! A process boundary is too coarse for some faults: a watch stream cut
//! between two events of one revision, one keep-alive answer lost, one slow
//! etcd answer. And the harness's checker is only worth something if it is
//! shown to catch real defects of the real code paths, so some failpoints
//! *are* defects (a dropped watch event, a watch resumed from the wrong
//! revision, a view emptied on an outage, a server that does not register
//! again, a controller deleting without its fence).
//!
//! Built on tikv's `fail` crate, and compiled in only under this crate's
//! `failpoints` feature (off by default; greet-server's and the controller's
//! features of the same name turn it on). Without the feature every
//! function here is a no-op the optimiser removes: [`fire`] is always
//! `None`, [`ENABLED`] is false, and a `FAILPOINTS` variable is ignored
//! with a warning. So production and release builds carry none.
//!
//! Actions are `fail`'s (`[p%][cnt*]task[(arg)]`, chained with `->`); the
//! failpoints here act on `return` (with an argument where it says). `sleep`,
//! `delay` and `pause` block the thread they run on, a Tokio worker here:
//! use the `return(ms)` of the delay failpoints instead.

/// Whether failpoints are compiled in (the `failpoints` feature).
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// In-code fault (a): after a watch response with two events or more, the
/// reflector applies only the first part of it (up to a boundary between
/// two events of one revision when there is one, as a fragment of a big
/// revision may end) and treats the stream as broken. The correct code
/// resumes from that revision and applies the rest. Use a probability
/// (`50%return`): cut every time, a revision that is redelivered whole is
/// cut again at the same place for ever.
pub const WATCH_CUT_MID_REVISION: &str = "watch-cut-mid-revision";
/// In-code fault (b): a keep-alive answer is dropped as if never received
/// (greet-server's lease keeper, the controller's election lease).
pub const KEEPALIVE_ANSWER_LOST: &str = "keepalive-answer-lost";
/// In-code fault (c): `return(ms)` holds every bounded etcd call's answer
/// `ms` milliseconds (default 200) before it is used, inside the call's
/// timeout: discovery's list and watch set-up, registration's reads,
/// writes and grants, the keep-alive sends.
pub const ETCD_SLOW_ANSWER: &str = "etcd-slow-answer";

/// Broken build, breaks (h) view equals etcd at its revision: the
/// reflector drops a delete event (its revision still counts as seen).
/// `1*return` drops the first one only.
pub const WATCH_DROP_DELETE: &str = "watch-drop-delete";
/// Broken build, breaks (h) (and often (b)): a watch is resumed `n`
/// revisions past where it should (`return(n)`, default 1: after a
/// progress notice, the last revision + 2), so an event there is never
/// delivered.
pub const WATCH_RESUME_SKIP: &str = "watch-resume-skip";
/// Broken build, breaks (c) static stability: when the watch fails, the
/// reflector reports every key removed (a client's view empties while
/// etcd is unreachable).
pub const WATCH_EMPTY_ON_OUTAGE: &str = "watch-empty-on-outage";
/// Broken build, breaks (g) a live server stays registered: when a
/// registered server finds its key gone, it does not register again.
pub const REGISTRAR_NO_REREGISTER: &str = "registrar-no-reregister";

/// Every failpoint of this crate, for listings and the harness.
pub const NAMES: [&str; 7] = [
    WATCH_CUT_MID_REVISION,
    KEEPALIVE_ANSWER_LOST,
    ETCD_SLOW_ANSWER,
    WATCH_DROP_DELETE,
    WATCH_RESUME_SKIP,
    WATCH_EMPTY_ON_OUTAGE,
    REGISTRAR_NO_REREGISTER,
];

/// What a `FAILPOINTS` value or a configuration call got wrong.
#[derive(Debug, thiserror::Error)]
pub enum FailpointError {
    /// An entry is not `name=actions`.
    #[error("failpoint entry {0:?} is not name=actions")]
    Entry(String),
    /// `fail` refused the actions.
    #[error("failpoint {name}: {reason}")]
    Actions {
        /// The failpoint.
        name: String,
        /// `fail`'s message.
        reason: String,
    },
    /// This build has no failpoints (the `failpoints` feature is off).
    #[error("failpoints are not compiled in (build with the `failpoints` feature)")]
    NotCompiled,
}

/// Evaluates failpoint `name`: `Some(arg)` when it fires with
/// `return[(arg)]`, `None` otherwise (and always without the feature). A
/// firing is logged at warn (`failpoint fired`, field `failpoint`) and
/// counted ([`hits`]), so a test can tell that its fault happened.
#[inline]
pub fn fire(name: &str) -> Option<Option<String>> {
    #[cfg(feature = "failpoints")]
    {
        let fired = fail::eval(name, |arg| arg);
        if fired.is_some() {
            enabled::count(name);
            tracing::warn!(failpoint = name, "failpoint fired");
        }
        fired
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        None
    }
}

/// The delay a delay failpoint asks for when it fires: its argument in
/// milliseconds, `default` without one (an argument that is not a number
/// counts as none).
pub fn fire_delay(name: &str, default: std::time::Duration) -> Option<std::time::Duration> {
    fire(name).map(|arg| {
        arg.and_then(|a| a.trim().parse::<u64>().ok())
            .map_or(default, std::time::Duration::from_millis)
    })
}

/// Sets failpoint `name` to `actions` (`fail::cfg`).
///
/// # Errors
/// Actions `fail` cannot parse; [`FailpointError::NotCompiled`] without the
/// feature.
pub fn set(name: &str, actions: &str) -> Result<(), FailpointError> {
    #[cfg(feature = "failpoints")]
    {
        fail::cfg(name, actions).map_err(|reason| FailpointError::Actions {
            name: name.to_owned(),
            reason,
        })
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = (name, actions);
        Err(FailpointError::NotCompiled)
    }
}

/// Turns failpoint `name` off (a no-op when it was not set).
pub fn remove(name: &str) {
    #[cfg(feature = "failpoints")]
    fail::remove(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Sets every entry of a `FAILPOINTS`-style list, `name=actions;...`
/// (blank entries skipped), and returns the names set. Names no code
/// evaluates are accepted and do nothing, as in `fail`.
///
/// # Errors
/// The first entry that is not `name=actions` or whose actions `fail`
/// refuses (entries before it are set); [`FailpointError::NotCompiled`]
/// for a non-blank list without the feature.
pub fn set_list(list: &str) -> Result<Vec<String>, FailpointError> {
    let mut names = Vec::new();
    for entry in list.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((name, actions)) = entry.split_once('=') else {
            return Err(FailpointError::Entry(entry.to_owned()));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(FailpointError::Entry(entry.to_owned()));
        }
        set(name, actions.trim())?;
        names.push(name.to_owned());
    }
    Ok(names)
}

/// For a binary's `main`: sets the failpoints the `FAILPOINTS` environment
/// variable lists (the syntax of `fail::FailScenario::setup`, which panics
/// on a bad entry; this returns the error so `main` can exit with it).
/// Without the feature a set variable is ignored with a warning, so a
/// production binary never acts on it. Call after logging is set up.
///
/// # Errors
/// As [`set_list`], with the feature.
pub fn setup_from_env() -> Result<Vec<String>, FailpointError> {
    let Ok(list) = std::env::var("FAILPOINTS") else {
        return Ok(Vec::new());
    };
    if !ENABLED {
        if !list.trim().is_empty() {
            tracing::warn!("FAILPOINTS is set but this build has no failpoints; ignoring it");
        }
        return Ok(Vec::new());
    }
    let names = set_list(&list)?;
    if !names.is_empty() {
        tracing::warn!(failpoints = %list.trim(), "failpoints set from FAILPOINTS: this process misbehaves on purpose");
    }
    Ok(names)
}

/// How many times failpoint `name` fired in this process (0 without the
/// feature).
pub fn hits(name: &str) -> u64 {
    #[cfg(feature = "failpoints")]
    {
        enabled::hits(name)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        0
    }
}

#[cfg(feature = "failpoints")]
mod enabled {
    use std::collections::HashMap;
    use std::sync::Mutex;

    static HITS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

    pub(super) fn count(name: &str) {
        let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
        *hits
            .get_or_insert_with(HashMap::new)
            .entry(name.to_owned())
            .or_default() += 1;
    }

    pub(super) fn hits(name: &str) -> u64 {
        let hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
        hits.as_ref()
            .and_then(|h| h.get(name).copied())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_list_is_an_error_not_a_panic() {
        assert!(matches!(
            set_list("no-equals-sign"),
            Err(FailpointError::Entry(_) | FailpointError::NotCompiled)
        ));
        assert!(matches!(
            set_list("=return"),
            Err(FailpointError::Entry(_) | FailpointError::NotCompiled)
        ));
        assert!(set_list(" ; ").is_ok_and(|n| n.is_empty()));
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_set_failpoint_fires_and_is_counted() {
        let name = "test-only-failpoint";
        assert!(matches!(
            set_list(&format!("{name}=bogus(")),
            Err(FailpointError::Actions { .. })
        ));
        assert_eq!(fire(name), None);
        assert_eq!(set_list(&format!("{name}=2*return(250)")).unwrap(), [name]);
        assert_eq!(
            fire_delay(name, std::time::Duration::ZERO),
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(fire(name), Some(Some("250".into())));
        assert_eq!(fire(name), None, "2* fires twice");
        assert_eq!(hits(name), 2);
        remove(name);
    }

    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn without_the_feature_nothing_fires() {
        assert!(matches!(
            set("x", "return"),
            Err(FailpointError::NotCompiled)
        ));
        assert_eq!(fire("x"), None);
        assert_eq!(hits("x"), 0);
    }
}
