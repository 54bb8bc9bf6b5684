//! Version splits (canaries): a service-level override that sends a set
//! share of a service's calls to the endpoints of some version, the rest
//! to the others, each side keeping its members' relative weights.
//!
//! - Key: `<root><service>/split` ([`split_key`]), beside the service's
//!   endpoint overrides, outside `/ns/`.
//! - Value: JSON [`Split`]: lanes (`{"version": "2.0.0", "percent": 5}`),
//!   why, who, when, an optional expiry. Lanes sum to at most 100; the
//!   rest goes to endpoints that no lane matches.
//! - A lane's version is read by [`parse_selector`]: a full version
//!   (`2.0.0`, `v2.0.0`, `2.0.0-rc.1`) means exactly that version (what an
//!   operator means by a canary of 2.0.0), anything else is a semver
//!   requirement read as `--version-req` reads it (`semver::VersionReq`:
//!   `^2`, `>=2.0.0, <3`, `2.*`; there a bare `2.0` means `^2.0`). A
//!   registered version is matched by [`version_matches`], the client's
//!   `--version-req` rule: a leading `v` is dropped, a non-semver version
//!   (legacy entries' `""` included) never matches a lane.
//! - The math is [`split_weights`], the one function every reader (client
//!   library, controller view, xDS) calls, so they agree on every weight.
//!
//! Invariants of [`split_weights`]: a side (a lane, or the rest) whose
//! endpoints are missing or all at weight 0 gets no calls, and its share
//! goes to the sides that have endpoints, in proportion to their shares;
//! when every side with endpoints asks for 0 %, the split is set aside
//! and the plain weights hold (calls are never sent to nothing); an
//! expired or unreadable split changes nothing.

use std::collections::HashMap;
use std::time::SystemTime;

use semver::{Comparator, Op, Version, VersionReq};
use serde::{Deserialize, Serialize};

use crate::schema::{SchemaError, ServiceName};

/// Most lanes one split may have.
pub const MAX_LANES: usize = 16;

/// The smallest total weight a split hands out: one millionth of the
/// calls is the resolution of a share.
pub const MIN_SCALE: u64 = 1_000_000;
/// Weight units per endpoint in use: rounding one endpoint's weight moves
/// its share by at most half a unit, so with at least this many units per
/// endpoint a side's share is off by at most 1/20,000 (0.005 %).
pub const UNITS_PER_ENDPOINT: u64 = 10_000;
/// The largest total weight a split hands out: below `u32::MAX`, which
/// bounds one weight (the scheduler's `u32`) and the sum of the weights
/// in one assignment (Envoy and gRPC reject a larger sum of locality
/// weights).
pub const MAX_SCALE: u64 = 1 << 31;

/// One lane: the calls a version gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lane {
    /// The version as the operator wrote it ([`parse_selector`] reads it).
    pub version: String,
    /// Share of the calls, 0..=100.
    pub percent: f64,
}

/// A version split of one service, as stored under [`split_key`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    /// The lanes, in order: an endpoint belongs to the first lane that
    /// matches its version; the others share what the lanes leave.
    pub lanes: Vec<Lane>,
    /// Why, as the operator said.
    #[serde(default)]
    pub reason: String,
    /// Who: the etcd user, or `--by`.
    #[serde(default)]
    pub by: String,
    /// When it was made (RFC 3339).
    pub at: String,
    /// When it stops applying (RFC 3339); `None`: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

impl Split {
    /// Whether `expires` has passed (an unreadable expiry counts as
    /// passed, as for endpoint overrides).
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires
            .as_deref()
            .is_some_and(|e| humantime::parse_rfc3339_weak(e).map_or(true, |t| t <= now))
    }

    /// The lanes' selectors, after checking the whole split: 1 to
    /// [`MAX_LANES`] lanes, each version readable and given once, each
    /// percentage a number in 0..=100, their sum at most 100.
    ///
    /// # Errors
    /// The first rule broken, in words for the operator.
    pub fn selectors(&self) -> Result<Vec<VersionReq>, SchemaError> {
        if self.lanes.is_empty() {
            return Err(SchemaError::Value("a split needs at least one lane".into()));
        }
        if self.lanes.len() > MAX_LANES {
            return Err(SchemaError::Value(format!(
                "{} lanes, above the maximum of {MAX_LANES}",
                self.lanes.len()
            )));
        }
        let mut sum = 0.0;
        let mut reqs = Vec::with_capacity(self.lanes.len());
        for (i, lane) in self.lanes.iter().enumerate() {
            check_percent(lane.percent)?;
            if self.lanes[..i].iter().any(|l| l.version == lane.version) {
                return Err(SchemaError::Value(format!(
                    "version {:?} has two lanes",
                    lane.version
                )));
            }
            sum += lane.percent;
            reqs.push(parse_selector(&lane.version)?);
        }
        if sum > 100.0 + 1e-9 {
            return Err(SchemaError::Value(format!(
                "the lanes add up to {sum}%, above 100%"
            )));
        }
        Ok(reqs)
    }

    /// `2.0.0=5 rest=95`: the lanes as the command line writes them.
    pub fn describe(&self) -> String {
        let sum: f64 = self.lanes.iter().map(|l| l.percent).sum();
        let mut s: Vec<String> = self
            .lanes
            .iter()
            .map(|l| format!("{}={}", l.version, l.percent))
            .collect();
        s.push(format!("rest={}", round6((100.0 - sum).max(0.0))));
        s.join(" ")
    }

    /// The stored JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain fields serialize")
    }
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn check_percent(p: f64) -> Result<(), SchemaError> {
    if p.is_finite() && (0.0..=100.0).contains(&p) {
        Ok(())
    } else {
        Err(SchemaError::Value(format!(
            "percentage {p} is not between 0 and 100"
        )))
    }
}

/// Every split under a root, by service.
pub type SplitMap = HashMap<ServiceName, Split>;

/// The key of a service's split.
pub fn split_key(root: &str, service: &ServiceName) -> String {
    format!("{root}{service}/split")
}

/// Reads a lane's version: a full semver version (an optional leading
/// `v`) means exactly that version; anything else is a requirement as
/// `semver::VersionReq` (and so `--version-req`) reads it.
///
/// Why not `VersionReq::parse` alone: it reads `2.0.0` as `^2.0.0`, so a
/// canary lane `2.0.0=5` would also catch 2.1.0 and 2.9.9; the operator
/// who types a version means that version.
///
/// # Errors
/// Empty text, or neither a version nor a requirement.
pub fn parse_selector(text: &str) -> Result<VersionReq, SchemaError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SchemaError::Value("empty version in a lane".into()));
    }
    if let Ok(v) = Version::parse(text.strip_prefix('v').unwrap_or(text)) {
        return Ok(VersionReq {
            comparators: vec![Comparator {
                op: Op::Exact,
                major: v.major,
                minor: Some(v.minor),
                patch: Some(v.patch),
                pre: v.pre,
            }],
        });
    }
    VersionReq::parse(text).map_err(|e| {
        SchemaError::Value(format!(
            "{text:?} is neither a version (2.0.0) nor a requirement (^2, >=2.0.0, <3): {e}"
        ))
    })
}

/// Whether a registered `version` satisfies `req` (no requirement:
/// everything does). A leading `v` is dropped; a version that is not
/// semver (a legacy entry's `""`, `canary`) matches no requirement. The
/// client's `--version-req` and every split lane use this one rule.
pub fn version_matches(req: Option<&VersionReq>, version: &str) -> bool {
    match req {
        None => true,
        Some(req) => Version::parse(version.trim_start_matches('v')).is_ok_and(|v| req.matches(&v)),
    }
}

/// Reads one command-line lane, `<version>=<percent>` (`2.0.0=5`,
/// `>=2.0.0, <3=10`, `2.0.0=2.5%`): the percentage follows the last `=`.
///
/// # Errors
/// No `=`, a percentage that is not a number in 0..=100, an unreadable
/// version.
pub fn parse_lane(spec: &str) -> Result<Lane, SchemaError> {
    let (version, percent) = spec.rsplit_once('=').ok_or_else(|| {
        SchemaError::Value(format!(
            "lane {spec:?}: want <version>=<percent>, e.g. 2.0.0=5"
        ))
    })?;
    let version = version.trim();
    let text = percent.trim().trim_end_matches('%').trim();
    let percent: f64 = text.parse().map_err(|_| {
        SchemaError::Value(format!(
            "lane {spec:?}: percentage {text:?} is not a number"
        ))
    })?;
    check_percent(percent).map_err(|e| SchemaError::Value(format!("lane {spec:?}: {e}")))?;
    parse_selector(version)?;
    Ok(Lane {
        version: version.to_owned(),
        percent,
    })
}

/// Parses a stored split, with the reason when it is not one.
///
/// # Errors
/// Not JSON, not this shape, lanes breaking [`Split::selectors`]'s rules,
/// or larger than [`super::MAX_VALUE_BYTES`].
pub fn parse_split_value(bytes: &[u8]) -> Result<Split, SchemaError> {
    if bytes.len() > super::MAX_VALUE_BYTES {
        return Err(SchemaError::Value(format!(
            "split of {} bytes, above {}",
            bytes.len(),
            super::MAX_VALUE_BYTES
        )));
    }
    let s: Split =
        serde_json::from_slice(bytes).map_err(|e| SchemaError::Value(format!("split: {e}")))?;
    s.selectors()
        .map_err(|e| SchemaError::Value(format!("split: {e}")))?;
    Ok(s)
}

/// Whether a split shapes the weights now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitApplies {
    /// It does.
    Yes,
    /// Its expiry has passed: plain weights.
    Expired,
    /// Its lanes do not read (a value written by hand): plain weights.
    Invalid,
}

/// One side of a split: a lane, or the rest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Side {
    /// The lane's version as written; `None`: the rest.
    pub lane: Option<String>,
    /// The share asked for, in percent.
    pub requested: f64,
    /// The share it gets, in percent: the requested one unless a side has
    /// no endpoints in use; the plain weights' share when the split does
    /// not apply.
    pub effective: f64,
    /// Its endpoints with a weight above 0 (before the split).
    pub endpoints: usize,
}

/// What a split did to a service's weights.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitOutcome {
    /// Whether it applies.
    pub applies: SplitApplies,
    /// The lanes in order, then the rest (empty when `Invalid`).
    pub sides: Vec<Side>,
    /// For each member (input order), the index of its side in `sides`.
    #[serde(skip)]
    pub side_of: Vec<usize>,
}

/// The weights a service's members get, and what the split did.
#[derive(Debug, Clone, PartialEq)]
pub struct Weighed {
    /// The weight of each member, in input order.
    pub weights: Vec<u32>,
    /// `None` when the service has no split.
    pub split: Option<SplitOutcome>,
}

/// The one computation of a service's weights under a split, called by
/// every reader so the client library, the controller's view and xDS send
/// the same shares.
///
/// `members` are the service's endpoints in use as `(version, weight)`,
/// the weight already effective (endpoint overrides applied: a drain is
/// 0). Each side's share of the calls (a lane's percentage, the rest what
/// the lanes leave) is divided among its members in proportion to their
/// weights. Weights come out as integers summing to about
/// `max(MIN_SCALE, UNITS_PER_ENDPOINT x endpoints)` (at most
/// [`MAX_SCALE`]), so a side's share is off by at most 0.005 % (rounding
/// half a unit per endpoint); a member with weight > 0 on a side with a
/// share > 0 never rounds down to 0.
///
/// Edge cases: no split, an expired one or an unreadable one leaves the
/// weights as they are; a side without an endpoint of weight > 0 gets
/// nothing and its share goes to the others in proportion to theirs; when
/// only one side has endpoints, or every side that has endpoints asks for
/// 0 %, the weights stay as they are (calls are never sent to nothing).
pub fn split_weights(split: Option<&Split>, members: &[(&str, u32)], now: SystemTime) -> Weighed {
    let plain = || members.iter().map(|(_, w)| *w).collect::<Vec<u32>>();
    let Some(split) = split else {
        return Weighed {
            weights: plain(),
            split: None,
        };
    };
    let Ok(reqs) = split.selectors() else {
        return Weighed {
            weights: plain(),
            split: Some(SplitOutcome {
                applies: SplitApplies::Invalid,
                sides: Vec::new(),
                side_of: Vec::new(),
            }),
        };
    };
    let rest = reqs.len();
    let side_of: Vec<usize> = members
        .iter()
        .map(|(v, _)| {
            reqs.iter()
                .position(|r| version_matches(Some(r), v))
                .unwrap_or(rest)
        })
        .collect();
    let lanes_sum: f64 = split.lanes.iter().map(|l| l.percent).sum();
    let mut sums = vec![0u64; rest + 1];
    let mut sides: Vec<Side> = split
        .lanes
        .iter()
        .map(|l| Side {
            lane: Some(l.version.clone()),
            requested: l.percent,
            effective: 0.0,
            endpoints: 0,
        })
        .chain(std::iter::once(Side {
            lane: None,
            requested: round6((100.0 - lanes_sum).max(0.0)),
            effective: 0.0,
            endpoints: 0,
        }))
        .collect();
    for ((_, w), s) in members.iter().zip(&side_of) {
        sums[*s] += u64::from(*w);
        if *w > 0 {
            sides[*s].endpoints += 1;
        }
    }
    let total: u64 = sums.iter().sum();
    let live = sums.iter().filter(|s| **s > 0).count();
    let asked: f64 = sides
        .iter()
        .zip(&sums)
        .filter(|(_, s)| **s > 0)
        .map(|(side, _)| side.requested)
        .sum();
    let expired = split.expired(now);
    if expired || live <= 1 || asked <= 0.0 {
        // Plain weights; each side's share is what they give it.
        for (side, s) in sides.iter_mut().zip(&sums) {
            side.effective = if total > 0 {
                round6(100.0 * *s as f64 / total as f64)
            } else {
                0.0
            };
        }
        return Weighed {
            weights: plain(),
            split: Some(SplitOutcome {
                applies: if expired {
                    SplitApplies::Expired
                } else {
                    SplitApplies::Yes
                },
                sides,
                side_of,
            }),
        };
    }
    for (side, s) in sides.iter_mut().zip(&sums) {
        side.effective = if *s > 0 {
            round6(100.0 * side.requested / asked)
        } else {
            0.0
        };
    }
    let in_use = members.iter().filter(|(_, w)| *w > 0).count() as u64;
    let scale = (UNITS_PER_ENDPOINT * in_use).clamp(MIN_SCALE, MAX_SCALE) as f64;
    let weights = members
        .iter()
        .zip(&side_of)
        .map(|((_, w), s)| {
            let share = if sums[*s] > 0 {
                sides[*s].requested / asked
            } else {
                0.0
            };
            if *w == 0 || share <= 0.0 {
                return 0;
            }
            let exact = scale * share * f64::from(*w) / sums[*s] as f64;
            (exact.round() as u32).max(1)
        })
        .collect();
    Weighed {
        weights,
        split: Some(SplitOutcome {
            applies: SplitApplies::Yes,
            sides,
            side_of,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn split(lanes: &[(&str, f64)]) -> Split {
        Split {
            lanes: lanes
                .iter()
                .map(|(v, p)| Lane {
                    version: (*v).to_owned(),
                    percent: *p,
                })
                .collect(),
            reason: String::new(),
            by: "me".into(),
            at: super::super::now_rfc3339(),
            expires: None,
        }
    }

    /// Each member's share of the calls under `weights`.
    fn shares(weights: &[u32]) -> Vec<f64> {
        let sum: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        weights.iter().map(|w| f64::from(*w) / sum as f64).collect()
    }

    fn side_share(w: &Weighed, members: &[(&str, u32)], version: &str) -> f64 {
        let s = shares(&w.weights);
        members
            .iter()
            .zip(&s)
            .filter(|((v, _), _)| *v == version)
            .map(|(_, s)| s)
            .sum()
    }

    const FLEET: [(&str, u32); 5] = [
        ("1.4.2", 100),
        ("1.4.2", 200),
        ("1.4.2", 300),
        ("2.0.0", 100),
        ("2.0.0", 300),
    ];

    #[test]
    fn each_side_gets_its_share_and_keeps_its_weights() {
        let now = SystemTime::now();
        let w = split_weights(Some(&split(&[("2.0.0", 5.0)])), &FLEET, now);
        let s = shares(&w.weights);
        assert!(
            (side_share(&w, &FLEET, "2.0.0") - 0.05).abs() < 1e-5,
            "{w:?}"
        );
        // Within each side, the registered proportions.
        for (i, want) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            assert!((s[i] / 0.95 - want).abs() < 1e-5, "{i}: {s:?}");
        }
        for (i, want) in [(3, 0.25), (4, 0.75)] {
            assert!((s[i] / 0.05 - want).abs() < 1e-5, "{i}: {s:?}");
        }
        let out = w.split.unwrap();
        assert_eq!(out.applies, SplitApplies::Yes);
        assert_eq!(out.side_of, vec![1, 1, 1, 0, 0]);
        assert_eq!(
            (out.sides[0].effective, out.sides[1].effective),
            (5.0, 95.0)
        );
        assert_eq!((out.sides[0].endpoints, out.sides[1].endpoints), (2, 3));
        let total: u64 = w.weights.iter().map(|w| u64::from(*w)).sum();
        assert!((total as i64 - MIN_SCALE as i64).abs() <= 5, "{total}");
    }

    #[test]
    fn no_split_leaves_the_weights() {
        let w = split_weights(None, &FLEET, SystemTime::now());
        assert_eq!(w.weights, vec![100, 200, 300, 100, 300]);
        assert!(w.split.is_none());
    }

    #[test]
    fn a_side_without_endpoints_gets_nothing_and_the_other_everything() {
        let now = SystemTime::now();
        let old: Vec<(&str, u32)> = FLEET[..3].to_vec();
        // No 2.0.0 at all: the rest keeps its plain weights.
        let w = split_weights(Some(&split(&[("2.0.0", 5.0)])), &old, now);
        assert_eq!(w.weights, vec![100, 200, 300]);
        let sides = w.split.unwrap().sides;
        assert_eq!((sides[0].effective, sides[1].effective), (0.0, 100.0));
        // Every 2.0.0 drained (weight 0): the same.
        let mut drained = FLEET.to_vec();
        drained[3].1 = 0;
        drained[4].1 = 0;
        let w = split_weights(Some(&split(&[("2.0.0", 5.0)])), &drained, now);
        assert_eq!(w.weights, vec![100, 200, 300, 0, 0]);
        // Only 2.0.0: it takes everything even at 5 %, and at 0 %.
        let new: Vec<(&str, u32)> = FLEET[3..].to_vec();
        for p in [5.0, 0.0] {
            let w = split_weights(Some(&split(&[("2.0.0", p)])), &new, now);
            assert_eq!(w.weights, vec![100, 300], "{p}");
        }
        // Every old endpoint drained, 2.0.0=5: 2.0.0 takes everything.
        let mut old_drained = FLEET.to_vec();
        for m in &mut old_drained[..3] {
            m.1 = 0;
        }
        let w = split_weights(Some(&split(&[("2.0.0", 5.0)])), &old_drained, now);
        assert_eq!(w.weights, vec![0, 0, 0, 100, 300]);
        // Nothing at all.
        let w = split_weights(Some(&split(&[("2.0.0", 5.0)])), &[], now);
        assert!(w.weights.is_empty());
    }

    #[test]
    fn zero_and_a_hundred_percent() {
        let now = SystemTime::now();
        let w = split_weights(Some(&split(&[("2.0.0", 0.0)])), &FLEET, now);
        assert_eq!(&w.weights[3..], &[0, 0]);
        assert!(w.weights[..3].iter().all(|w| *w > 0));
        assert!((side_share(&w, &FLEET, "1.4.2") - 1.0).abs() < 1e-12);
        let w = split_weights(Some(&split(&[("2.0.0", 100.0)])), &FLEET, now);
        assert_eq!(&w.weights[..3], &[0, 0, 0]);
        let s = shares(&w.weights);
        assert!(
            (s[3] - 0.25).abs() < 1e-6 && (s[4] - 0.75).abs() < 1e-6,
            "{s:?}"
        );
    }

    #[test]
    fn an_expired_split_changes_nothing() {
        let now = SystemTime::now();
        let mut s = split(&[("2.0.0", 5.0)]);
        s.expires =
            Some(humantime::format_rfc3339_seconds(now - Duration::from_secs(1)).to_string());
        let w = split_weights(Some(&s), &FLEET, now);
        assert_eq!(w.weights, vec![100, 200, 300, 100, 300]);
        assert_eq!(w.split.unwrap().applies, SplitApplies::Expired);
        s.expires =
            Some(humantime::format_rfc3339_seconds(now + Duration::from_secs(60)).to_string());
        let w = split_weights(Some(&s), &FLEET, now);
        assert_eq!(w.split.unwrap().applies, SplitApplies::Yes);
        s.expires = Some("soon".into());
        assert_eq!(
            split_weights(Some(&s), &FLEET, now).split.unwrap().applies,
            SplitApplies::Expired
        );
    }

    #[test]
    fn several_lanes_and_their_order() {
        let now = SystemTime::now();
        let members = [
            ("1.0.0", 100),
            ("2.0.0", 100),
            ("2.1.0", 100),
            ("2.1.0", 300),
            ("", 100),
        ];
        // 2.0.0 exactly, then the rest of ^2: 2.1.0 falls in the second.
        let w = split_weights(
            Some(&split(&[("2.0.0", 10.0), ("^2", 30.0)])),
            &members,
            now,
        );
        let s = shares(&w.weights);
        assert!((s[1] - 0.10).abs() < 1e-5, "{s:?}");
        assert!(
            (s[2] - 0.075).abs() < 1e-5 && (s[3] - 0.225).abs() < 1e-5,
            "{s:?}"
        );
        // The rest: 1.0.0 and the legacy entry, 30 % each.
        assert!(
            (s[0] - 0.30).abs() < 1e-5 && (s[4] - 0.30).abs() < 1e-5,
            "{s:?}"
        );
        // No 2.0.0: its 10 % goes to the others by their shares (30:60).
        let w = split_weights(
            Some(&split(&[("2.0.0", 10.0), ("^2", 30.0)])),
            &[members[0], members[2], members[3], members[4]],
            now,
        );
        let s = shares(&w.weights);
        let lane2 = s[1] + s[2];
        assert!((lane2 - 1.0 / 3.0).abs() < 1e-5, "{s:?}");
    }

    #[test]
    fn rounding_stays_far_below_a_tenth_of_a_percent() {
        let now = SystemTime::now();
        // Many endpoints, skewed weights, an odd share.
        for n in [1usize, 7, 100, 1000, 20_000] {
            let members: Vec<(&str, u32)> = (0..n)
                .map(|i| {
                    (
                        if i % 3 == 0 { "2.0.0" } else { "1.0.0" },
                        [1, 50, 9900, 10_000][i % 4],
                    )
                })
                .chain([("1.0.0", 1)])
                .collect();
            let w = split_weights(Some(&split(&[("2.0.0", 0.7)])), &members, now);
            let canary = side_share(&w, &members, "2.0.0");
            assert!((canary - 0.007).abs() < 5e-5, "{n}: {canary}");
            let total: u64 = w.weights.iter().map(|w| u64::from(*w)).sum();
            assert!(total < u64::from(u32::MAX), "{n}: {total}");
            assert!(w.weights.iter().all(|w| *w > 0), "{n}: nobody rounds to 0");
        }
    }

    #[test]
    fn versions_read_as_an_operator_means_them() {
        let exact = parse_selector("2.0.0").unwrap();
        assert!(version_matches(Some(&exact), "2.0.0"));
        assert!(version_matches(Some(&exact), "v2.0.0"));
        assert!(!version_matches(Some(&exact), "2.0.1"), "exact, not ^2.0.0");
        assert!(!version_matches(Some(&exact), "2.1.0"));
        assert!(!version_matches(Some(&exact), ""));
        assert!(version_matches(
            Some(&parse_selector("v2.0.0").unwrap()),
            "2.0.0"
        ));
        let rc = parse_selector("2.0.0-rc.1").unwrap();
        assert!(version_matches(Some(&rc), "2.0.0-rc.1"));
        assert!(!version_matches(Some(&rc), "2.0.0"));
        // Anything else: a requirement, as --version-req reads it.
        let caret = parse_selector("^2").unwrap();
        assert!(version_matches(Some(&caret), "2.7.1"));
        let range = parse_selector(">=2.0.0, <3").unwrap();
        assert!(version_matches(Some(&range), "2.9.0") && !version_matches(Some(&range), "3.0.0"));
        assert_eq!(
            parse_selector("2.0").unwrap(),
            VersionReq::parse("2.0").unwrap()
        );
        assert!(parse_selector("").is_err());
        assert!(parse_selector("banana").is_err());
    }

    #[test]
    fn lanes_and_values_are_checked() {
        assert_eq!(
            parse_lane("2.0.0=5").unwrap(),
            Lane {
                version: "2.0.0".into(),
                percent: 5.0
            }
        );
        assert_eq!(parse_lane("2.0.0=2.5%").unwrap().percent, 2.5);
        assert_eq!(parse_lane(">=2.0.0, <3=10").unwrap().version, ">=2.0.0, <3");
        for bad in [
            "2.0.0",
            "2.0.0=",
            "2.0.0=x",
            "2.0.0=101",
            "2.0.0=-1",
            "=5",
            "x y=5",
            "2.0.0=NaN",
            "2.0.0=inf",
        ] {
            assert!(parse_lane(bad).is_err(), "{bad}");
        }
        let s = split(&[("2.0.0", 60.0), ("3.0.0", 50.0)]);
        let e = s.selectors().unwrap_err().to_string();
        assert!(e.contains("above 100"), "{e}");
        assert!(split(&[("2.0.0", 5.0), ("2.0.0", 5.0)])
            .selectors()
            .is_err());
        assert!(split(&[]).selectors().is_err());
        let s = split(&[("2.0.0", 5.0)]);
        assert_eq!(parse_split_value(s.to_json().as_bytes()).unwrap(), s);
        assert_eq!(s.describe(), "2.0.0=5 rest=95");
        // Malformed stored values: refused (readers warn and ignore them).
        for bad in [
            &b"{"[..],
            br#"{"lanes": [], "at": "x"}"#,
            br#"{"lanes": [{"version": "2.0.0", "percent": 150}], "at": "x"}"#,
            br#"{"lanes": [{"version": "2.0.0", "percent": "5"}], "at": "x"}"#,
            br#"{"lanes": [{"version": "2.0.0", "percent": 60}, {"version": "1.0.0", "percent": 60}], "at": "x"}"#,
            br#"{"lanes": [{"version": "??", "percent": 5}], "at": "x"}"#,
            br#"[1, 2]"#,
        ] {
            assert!(parse_split_value(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse_split_value(&vec![b' '; super::super::MAX_VALUE_BYTES + 1]).is_err());
        // A hand-written split with bad lanes given to the math: ignored.
        let w = split_weights(Some(&split(&[("??", 5.0)])), &FLEET, SystemTime::now());
        assert_eq!(w.weights, vec![100, 200, 300, 100, 300]);
        assert_eq!(w.split.unwrap().applies, SplitApplies::Invalid);
    }
}
