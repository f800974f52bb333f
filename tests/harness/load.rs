//! Steady load for fault tests: GETs at a fixed rate through a sidecar's
//! outbound listener, each outcome recorded under the phase it was sent in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Requests and failures of one phase, with the first failures kept.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub requests: u64,
    pub failed: u64,
    pub examples: Vec<String>,
}

pub struct Load {
    phase: Arc<AtomicUsize>,
    names: Arc<Mutex<Vec<String>>>,
    tallies: Arc<Mutex<BTreeMap<usize, Tally>>>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `rate` GETs a second to `host` through `outbound`, on a pooled
    /// keep-alive client (as an app would), each with a 10 s timeout, in the
    /// phase `first`. Stops by itself after `limit` in any case.
    pub fn start(outbound: SocketAddr, host: &str, rate: u32, first: &str, limit: Duration) -> Load {
        let phase = Arc::new(AtomicUsize::new(0));
        let names = Arc::new(Mutex::new(vec![first.to_string()]));
        let tallies: Arc<Mutex<BTreeMap<usize, Tally>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (p, t, st, host) = (phase.clone(), tallies.clone(), stop.clone(), host.to_string());
        let task = tokio::spawn(async move {
            let client = crate::pooled_client();
            let mut every = tokio::time::interval(Duration::from_secs(1) / rate);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let until = tokio::time::Instant::now() + limit;
            let mut calls = tokio::task::JoinSet::new();
            while !st.load(Ordering::Relaxed) && tokio::time::Instant::now() < until {
                every.tick().await;
                let (client, host, t) = (client.clone(), host.clone(), t.clone());
                let phase = p.load(Ordering::Relaxed);
                calls.spawn(async move {
                    let r =
                        tokio::time::timeout(Duration::from_secs(10), crate::send(&client, outbound, &host, "/", &[]))
                            .await;
                    let failure = match r {
                        Ok(Ok((200, _, _))) => None,
                        Ok(Ok((code, h, body))) => Some(format!(
                            "{code} {} {}",
                            h.get("x-weft-error").and_then(|v| v.to_str().ok()).unwrap_or("-"),
                            body.trim()
                        )),
                        Ok(Err(e)) => Some(format!("error: {e}")),
                        Err(_) => Some("no answer in 10 s".to_string()),
                    };
                    let mut t = t.lock().unwrap();
                    let tally = t.entry(phase).or_default();
                    tally.requests += 1;
                    if let Some(f) = failure {
                        tally.failed += 1;
                        if tally.examples.len() < 5 {
                            tally.examples.push(f);
                        }
                    }
                });
                while calls.try_join_next().is_some() {}
            }
            while calls.join_next().await.is_some() {}
        });
        Load { phase, names, tallies, stop, task: Some(task) }
    }

    /// Requests sent from now on count for phase `name`.
    pub fn phase(&self, name: &str) {
        let mut names = self.names.lock().unwrap();
        names.push(name.to_string());
        self.phase.store(names.len() - 1, Ordering::Relaxed);
    }

    /// Calls of the current phase answered (or failed) so far.
    pub fn answered(&self) -> u64 {
        let phase = self.phase.load(Ordering::Relaxed);
        self.tallies.lock().unwrap().get(&phase).map_or(0, |t| t.requests)
    }

    /// Waits until `n` more calls of the current phase have been answered:
    /// the load has run through the system, not merely for a while.
    pub async fn wait_answered(&self, n: u64) {
        let target = self.answered() + n;
        crate::eventually(&format!("{n} more calls answered"), Duration::from_secs(60), || async move {
            self.answered() >= target
        })
        .await;
    }

    /// Stops sending, waits for the calls in flight, and returns each
    /// phase's tally in order.
    pub async fn finish(mut self) -> Vec<(String, Tally)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let names = self.names.lock().unwrap().clone();
        let tallies = self.tallies.lock().unwrap();
        names.iter().enumerate().map(|(i, n)| (n.clone(), tallies.get(&i).cloned().unwrap_or_default())).collect()
    }
}

/// The tallies as a Markdown table.
pub fn table(rows: &[(String, Tally)]) -> String {
    let mut out = String::from("| phase | requests | failed |\n|---|---|---|\n");
    for (name, t) in rows {
        out.push_str(&format!("| {name} | {} | {} |\n", t.requests, t.failed));
    }
    out
}
