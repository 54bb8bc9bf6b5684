//! Randomised trials of override sequences (issue 35, must-show 3): seeded
//! random sequences of registrations (new process, re-registration on the
//! same lease, replacement by a new process, deregistration), operators'
//! drains and weights (incarnation-scoped or sticky), undrains and client
//! restarts, against a real etcd, a client of the library and a controller
//! (in this process, its leader sweeping lapsed overrides every 200 ms).
//! After every step a model of the scoping rules says what each endpoint's
//! effective weight must be; the client and the controller's view must
//! converge to it, and every override that still applies (sticky, or made
//! for a live incarnation) must still be in etcd: none lost, none applied
//! to the wrong incarnation.
//!
//! `OVERRIDE_TRIALS` (default 25, what CI runs) and `OVERRIDE_SEED`
//! (default 1) choose the trials; the full count by hand:
//! `OVERRIDE_TRIALS=1000 cargo test -p controller --test override_trials -- --nocapture`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{fast_config, Ctl};
use controller::operator::{self, Change, OperatorError};
use etcd_client::{Client, PutOptions};
use etcd_lb::{Addr, Balancer, CancellationToken, Discovery, EtcdConfig};
use etcd_lb_testkit::Etcd;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ADDRS: u16 = 3;
const STEPS: usize = 12;
const ROOT: &str = "/ns/";
const OVERRIDES: &str = "/lb-overrides/";

/// What an override was made for, in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The registration with this incarnation number.
    Incarnation(u32),
    Sticky,
}

#[derive(Debug, Clone, Copy)]
struct ModelOverride {
    weight: u32,
    scope: Scope,
}

/// One address in the model.
#[derive(Debug, Clone, Default)]
struct Slot {
    /// Registered: (incarnation, lease, weight).
    reg: Option<(u32, i64, u32)>,
    ov: Option<ModelOverride>,
}

impl Slot {
    /// The override applies to what is registered now.
    fn applies(&self) -> bool {
        match (self.ov, self.reg) {
            (Some(o), Some((inc, ..))) => match o.scope {
                Scope::Sticky => true,
                Scope::Incarnation(i) => i == inc,
            },
            _ => false,
        }
    }

    /// The effective weight readers must use; `None`: not registered.
    fn expected(&self) -> Option<u32> {
        let (_, _, w) = self.reg?;
        Some(match self.ov {
            Some(o) if self.applies() => o.weight,
            _ => w,
        })
    }

    /// The override must still be in etcd (it can still apply).
    fn must_exist(&self) -> bool {
        match self.ov {
            Some(ModelOverride {
                scope: Scope::Sticky,
                ..
            }) => true,
            Some(ModelOverride {
                scope: Scope::Incarnation(i),
                ..
            }) => self.reg.is_some_and(|(inc, ..)| inc == i),
            None => false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Register,
    Reregister,
    /// A new process at the address; `crashed`: the old one's lease still
    /// lives.
    Replace {
        crashed: bool,
    },
    Deregister,
    Drain {
        sticky: bool,
    },
    Weight {
        weight: u32,
        sticky: bool,
    },
    Undrain,
    ClientRestart,
}

fn draw(rng: &mut StdRng) -> (u16, Op) {
    let slot = rng.random_range(0..ADDRS);
    let op = match rng.random_range(0..16) {
        0..=1 => Op::Register,
        2..=3 => Op::Reregister,
        4..=5 => Op::Replace {
            crashed: rng.random_bool(0.5),
        },
        6 => Op::Deregister,
        7..=9 => Op::Drain {
            sticky: rng.random_bool(0.3),
        },
        10..=11 => Op::Weight {
            weight: rng.random_range(1..=500),
            sticky: rng.random_bool(0.3),
        },
        12..=14 => Op::Undrain,
        _ => Op::ClientRestart,
    };
    (slot, op)
}

struct Trial<'a> {
    etcd: &'a Etcd,
    kv: Client,
    ctl: &'a Ctl,
    service: String,
    addrs: Vec<String>,
    slots: Vec<Slot>,
    incarnations: u32,
    client: (Balancer, Discovery, CancellationToken),
    /// Leases of crashed processes, still alive.
    orphans: Vec<i64>,
}

async fn start_client(
    etcd: &Etcd,
    service: &str,
) -> Result<(Balancer, Discovery, CancellationToken)> {
    common::library_client(etcd, service).await
}

impl Trial<'_> {
    fn key(&self, i: usize) -> String {
        format!("{ROOT}{}/{}", self.service, self.addrs[i])
    }

    fn override_key(&self, i: usize) -> String {
        format!("{OVERRIDES}{}/endpoints/{}", self.service, self.addrs[i])
    }

    async fn put_registration(&mut self, i: usize, lease: i64, weight: u32) -> Result<()> {
        let value = format!(
            r#"{{"addr":"{}","version":"1.0.0","weight":{weight}}}"#,
            self.addrs[i]
        );
        self.kv
            .put(
                self.key(i),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(())
    }

    async fn register(&mut self, i: usize, rng: &mut StdRng) -> Result<()> {
        let lease = self.kv.lease_grant(300, None).await?.id();
        let weight = rng.random_range(1..=300);
        self.put_registration(i, lease, weight).await?;
        self.incarnations += 1;
        self.slots[i].reg = Some((self.incarnations, lease, weight));
        Ok(())
    }

    async fn apply(&mut self, i: usize, op: Op, rng: &mut StdRng) -> Result<()> {
        let addr = self.addrs[i].clone();
        let etcd = EtcdConfig::plain([self.etcd.endpoint()]);
        match op {
            Op::Register if self.slots[i].reg.is_none() => self.register(i, rng).await?,
            Op::Register | Op::Reregister => {
                // The key vanishes and the same process puts it again on
                // its lease (the registrar's re-registration).
                if let Some((_, lease, weight)) = self.slots[i].reg {
                    self.kv.delete(self.key(i), None).await?;
                    self.put_registration(i, lease, weight).await?;
                }
            }
            Op::Replace { crashed } => {
                if let Some((_, lease, _)) = self.slots[i].reg.take() {
                    if crashed {
                        // The old process died without revoking: its lease
                        // lives on (to its TTL) while the new one registers,
                        // so no sweep removes the old override either.
                        self.orphans.push(lease);
                    } else {
                        self.kv.lease_revoke(lease).await?;
                    }
                }
                self.register(i, rng).await?;
            }
            Op::Deregister => {
                if let Some((_, lease, _)) = self.slots[i].reg.take() {
                    self.kv.lease_revoke(lease).await?;
                }
            }
            Op::Drain { sticky } | Op::Weight { sticky, .. } => {
                let weight = match op {
                    Op::Weight { weight, .. } => Some(weight),
                    _ => None,
                };
                let registered = self.slots[i].reg;
                let change = Change {
                    weight,
                    reason: "trial".into(),
                    by: Some("trial".into()),
                    for_: None,
                    sticky,
                    force: sticky,
                };
                let r = operator::set(&etcd, ROOT, OVERRIDES, &self.service, &addr, change).await;
                match (r, registered) {
                    (Ok(_), Some((inc, ..))) => {
                        self.slots[i].ov = Some(ModelOverride {
                            weight: weight.unwrap_or(0),
                            scope: if sticky {
                                Scope::Sticky
                            } else {
                                Scope::Incarnation(inc)
                            },
                        });
                    }
                    (Ok(_), None) if sticky => {
                        self.slots[i].ov = Some(ModelOverride {
                            weight: weight.unwrap_or(0),
                            scope: Scope::Sticky,
                        });
                    }
                    (Err(OperatorError::NotRegistered(_)), None) => {}
                    (r, reg) => bail!("{op:?} of {addr} (registered {reg:?}): {r:?}"),
                }
            }
            Op::Undrain => {
                let r = operator::clear(&etcd, OVERRIDES, &self.service, &addr).await;
                let had = self.slots[i].ov.take();
                // An override that can no longer apply may have been swept
                // away by the controller already: either outcome is right.
                let may_be_gone = had.is_some_and(|_| {
                    !Slot {
                        reg: self.slots[i].reg,
                        ov: had,
                    }
                    .must_exist()
                });
                match (&r, had) {
                    (Ok(_), Some(_)) => {}
                    (Err(OperatorError::Usage(_)), None) => {}
                    (Err(OperatorError::Usage(_)), Some(_)) if may_be_gone => {}
                    _ => bail!("undrain of {addr} (model {had:?}): {r:?}"),
                }
            }
            Op::ClientRestart => {
                self.client.2.cancel();
                self.client = start_client(self.etcd, &self.service).await?;
            }
        }
        Ok(())
    }

    /// Waits until the client and the controller's view weigh every
    /// address as the model says, and every override that can still apply
    /// is in etcd.
    async fn check(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            let mismatch = self.mismatch().await?;
            let Some(why) = mismatch else { return Ok(()) };
            if started.elapsed() > Duration::from_secs(10) {
                bail!("{why}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn mismatch(&mut self) -> Result<Option<String>> {
        let view = self.ctl.get("/services").await?.1;
        for (i, slot) in self.slots.iter().enumerate() {
            let addr = &self.addrs[i];
            let parsed: Addr = addr.parse()?;
            let want = slot.expected();
            let client = self.client.0.weight_of(&parsed);
            if client != want {
                return Ok(Some(format!(
                    "client weighs {addr} {client:?}, model {want:?} ({slot:?})"
                )));
            }
            let shown = common::find_member(&view, &self.service, addr)
                .and_then(|m| m["weight"].as_u64())
                .map(|w| w as u32);
            if shown != want {
                return Ok(Some(format!(
                    "controller shows {addr} at {shown:?}, model {want:?} ({slot:?})"
                )));
            }
            if slot.must_exist() {
                let stored = self.kv.get(self.override_key(i), None).await?;
                if stored.kvs().is_empty() {
                    return Ok(Some(format!("override of {addr} lost ({slot:?})")));
                }
            }
        }
        Ok(None)
    }

    async fn cleanup(mut self) -> Result<()> {
        self.client.2.cancel();
        let leases: Vec<i64> = self
            .slots
            .iter()
            .filter_map(|s| s.reg.map(|r| r.1))
            .collect();
        for lease in leases.into_iter().chain(self.orphans.drain(..)) {
            self.kv.lease_revoke(lease).await?;
        }
        let prefix = format!("{OVERRIDES}{}/", self.service);
        self.kv
            .delete(
                prefix,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await?;
        Ok(())
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
async fn random_override_sequences_keep_every_override_on_its_incarnation() -> Result<()> {
    let trials = env_u64("OVERRIDE_TRIALS", 25);
    let seed = env_u64("OVERRIDE_SEED", 1);
    let etcd = Etcd::start().await?;
    let kv = etcd.client().await?;
    // Registrations here have no server behind them: the controller must
    // not delete them as dead, only sweep overrides.
    let ctl = Ctl::start(
        &etcd,
        controller::config::Config {
            dead_after: Duration::from_secs(3600),
            ..fast_config()
        },
    )
    .await?;
    let mut ops: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    for t in 0..trials {
        let trial_seed = seed + t;
        let mut rng = StdRng::seed_from_u64(trial_seed);
        let service = format!("trial{trial_seed}");
        let client = start_client(&etcd, &service).await?;
        let mut trial = Trial {
            etcd: &etcd,
            kv: kv.clone(),
            ctl: &ctl,
            addrs: (0..ADDRS)
                .map(|i| format!("127.0.0.1:{}", 40_000 + i))
                .collect(),
            slots: vec![Slot::default(); usize::from(ADDRS)],
            service,
            incarnations: 0,
            client,
            orphans: Vec::new(),
        };
        let mut done = Vec::new();
        for _ in 0..STEPS {
            let (slot, op) = draw(&mut rng);
            done.push((slot, op));
            let name = format!("{op:?}");
            *ops.entry(name.split([' ', '{']).next().unwrap_or("").to_owned())
                .or_default() += 1;
            trial
                .apply(usize::from(slot), op, &mut rng)
                .await
                .with_context(|| format!("seed {trial_seed}, steps {done:?}"))?;
            trial
                .check()
                .await
                .with_context(|| format!("seed {trial_seed}, steps {done:?}"))?;
        }
        trial.cleanup().await?;
    }
    println!(
        "{trials} trials of {STEPS} steps from seed {seed} in {:.1?}: no override lost, none applied to another incarnation; steps by kind {ops:?}",
        started.elapsed()
    );
    ctl.stop().await?;
    Ok(())
}
