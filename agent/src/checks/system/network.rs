//! The network probe: traffic and error counters per interface, and their rates.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use outpost_protocol::probe::NetworkProbe;
use outpost_protocol::{Metric, Status};
use sysinfo::{InterfaceOperationalState, NetworkData, Networks};

use super::{headline, human_bytes, lock, metric, Outcome, Shared};

/// A sample younger than this is not replaced: rates over a shorter window are noise.
const MIN_RATE_WINDOW: Duration = Duration::from_secs(1);

/// Counter names, in the order of [`Counters`].
const COUNTERS: [&str; 6] = [
    "rx_bytes",
    "tx_bytes",
    "rx_packets",
    "tx_packets",
    "rx_errors",
    "tx_errors",
];

type Counters = [u64; 6];

/// What the network probe keeps between runs.
#[derive(Default)]
pub(super) struct State {
    networks: Option<Networks>,
    samples: HashMap<String, Sample>,
}

struct Sample {
    at: Instant,
    counters: Counters,
    /// The rates computed when this sample was taken, repeated by runs that come too soon.
    rates: Option<[Option<f64>; 6]>,
}

struct Interface {
    name: String,
    counters: Counters,
    state: InterfaceOperationalState,
    loopback: bool,
}

fn counters(data: &NetworkData) -> Counters {
    [
        data.total_received(),
        data.total_transmitted(),
        data.total_packets_received(),
        data.total_packets_transmitted(),
        data.total_errors_on_received(),
        data.total_errors_on_transmitted(),
    ]
}

/// `lo`, or an interface whose addresses are all loopback ones.
fn is_loopback(name: &str, data: &NetworkData) -> bool {
    name == "lo"
        || (!data.ip_networks().is_empty()
            && data.ip_networks().iter().all(|n| n.addr.is_loopback()))
}

fn is_down(state: InterfaceOperationalState) -> bool {
    matches!(
        state,
        InterfaceOperationalState::Down
            | InterfaceOperationalState::NotPresent
            | InterfaceOperationalState::LowerLayerDown
    )
}

pub(super) fn run(shared: &Shared, probe: &NetworkProbe) -> Outcome {
    let mut state = lock(&shared.net);
    let state = &mut *state;
    let networks = match &mut state.networks {
        Some(networks) => {
            networks.refresh(true);
            networks
        }
        slot @ None => match Networks::new() {
            Ok(mut networks) => {
                networks.refresh(true);
                slot.insert(networks)
            }
            Err(e) => return Outcome::unknown(format!("cannot list network interfaces: {e}")),
        },
    };
    let mut all: Vec<Interface> = networks
        .iter()
        .map(|(name, data)| {
            let name = name.to_string_lossy().into_owned();
            Interface {
                loopback: is_loopback(&name, data),
                counters: counters(data),
                state: data.operational_state(),
                name,
            }
        })
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let now = Instant::now();
    // Forget interfaces that are gone.
    state
        .samples
        .retain(|name, _| all.iter().any(|i| &i.name == name));

    let chosen: Vec<&Interface> = match &probe.interface {
        Some(wanted) => match all.iter().find(|i| &i.name == wanted) {
            Some(i) => vec![i],
            None => {
                let present: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
                let present = if present.is_empty() {
                    "none".to_string()
                } else {
                    present.join(", ")
                };
                return Outcome::critical(headline(
                    "NETWORK",
                    Status::Critical,
                    &format!("no interface {wanted} (present: {present})"),
                ));
            }
        },
        None => all.iter().filter(|i| !i.loopback).collect(),
    };
    if chosen.is_empty() {
        return Outcome::new(
            Status::Ok,
            headline("NETWORK", Status::Ok, "no interfaces but loopback"),
        );
    }

    let mut status = Status::Ok;
    let mut summary = Vec::new();
    let mut details = Vec::new();
    let mut metrics = Vec::new();
    for i in &chosen {
        let rates = rates_for(&mut state.samples, i, now);
        for (k, name) in COUNTERS.iter().enumerate() {
            metrics.push(Metric {
                min: Some(0.0),
                ..metric(
                    &format!("{}_{name}", i.name),
                    i.counters[k] as f64,
                    Some("c"),
                )
            });
        }
        if let Some(rates) = rates {
            for (k, name) in COUNTERS.iter().enumerate() {
                if let Some(rate) = rates[k] {
                    let unit = if k < 2 { "B/s" } else { "/s" };
                    metrics.push(Metric {
                        min: Some(0.0),
                        ..metric(
                            &format!("{}_{name}_per_s", i.name),
                            (rate * 100.0).round() / 100.0,
                            Some(unit),
                        )
                    });
                }
            }
        }
        let down = is_down(i.state);
        if down && probe.interface.is_some() {
            status = Status::Critical;
        }
        let traffic = match rates {
            Some([Some(rx), Some(tx), ..]) => format!(
                "rx {}/s tx {}/s",
                human_bytes(rx.round() as u64),
                human_bytes(tx.round() as u64)
            ),
            _ => format!(
                "rx {} tx {} in all (rates from the next run)",
                human_bytes(i.counters[0]),
                human_bytes(i.counters[1])
            ),
        };
        summary.push(if down {
            format!("{} is {}", i.name, i.state)
        } else {
            format!("{} {traffic}", i.name)
        });
        let errors = i.counters[4].saturating_add(i.counters[5]);
        details.push(format!(
            "{} ({}): rx {} / {} packets / {} errors, tx {} / {} packets / {} errors{}",
            i.name,
            i.state,
            human_bytes(i.counters[0]),
            i.counters[2],
            i.counters[4],
            human_bytes(i.counters[1]),
            i.counters[3],
            i.counters[5],
            if errors > 0 { " (!)" } else { "" }
        ));
    }
    const SHOWN: usize = 4;
    let mut text = summary
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if summary.len() > SHOWN {
        text.push_str(&format!(" and {} more", summary.len() - SHOWN));
    }
    let mut o = Outcome::new(status, headline("NETWORK", status, &text));
    for line in details {
        o.note(line);
    }
    o.metrics = metrics;
    o
}

/// Rates of `i`'s counters since its previous sample, and the new sample kept when the
/// previous one is old enough. `None` on an interface's first run; a counter that went
/// backwards has no rate.
fn rates_for(
    samples: &mut HashMap<String, Sample>,
    i: &Interface,
    now: Instant,
) -> Option<[Option<f64>; 6]> {
    let Some(prev) = samples.get(&i.name) else {
        samples.insert(
            i.name.clone(),
            Sample {
                at: now,
                counters: i.counters,
                rates: None,
            },
        );
        return None;
    };
    let elapsed = now.saturating_duration_since(prev.at);
    if elapsed < MIN_RATE_WINDOW {
        return prev.rates;
    }
    let secs = elapsed.as_secs_f64();
    let mut rates = [None; 6];
    for (k, rate) in rates.iter_mut().enumerate() {
        if let Some(delta) = i.counters[k].checked_sub(prev.counters[k]) {
            *rate = Some(delta as f64 / secs);
        }
    }
    samples.insert(
        i.name.clone(),
        Sample {
            at: now,
            counters: i.counters,
            rates: Some(rates),
        },
    );
    Some(rates)
}

#[cfg(test)]
mod tests {
    use super::super::tests::find;
    use super::super::SystemProbes;
    use super::*;
    use outpost_protocol::probe::Probe;

    fn net(interface: Option<&str>) -> Probe {
        Probe::Network(NetworkProbe {
            interface: interface.map(str::to_string),
        })
    }

    /// Interfaces as the kernel lists them.
    fn sys_interfaces() -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn sys_counter(interface: &str, name: &str) -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{interface}/statistics/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn unknown_interface_is_critical_naming_those_present() {
        let o = SystemProbes::new().run(&net(Some("no-such-if0"))).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output
                .starts_with("NETWORK CRITICAL - no interface no-such-if0 (present: "),
            "{}",
            o.output
        );
        for name in sys_interfaces() {
            assert!(o.output.contains(&name), "{name} missing: {}", o.output);
        }
    }

    #[tokio::test]
    async fn loopback_counters_then_rates() {
        let probes = SystemProbes::new();
        assert!(sys_interfaces().contains(&"lo".to_string()));
        let before = sys_counter("lo", "rx_bytes");
        let o = probes.run(&net(Some("lo"))).await;
        assert_ne!(o.status, Status::Unknown, "{o:?}");
        assert!(o.output.starts_with("NETWORK "), "{}", o.output);
        let after = sys_counter("lo", "rx_bytes");
        let rx = find(&o, "lo_rx_bytes");
        assert_eq!(rx.unit.as_deref(), Some("c"));
        assert!(
            (before as f64..=after as f64).contains(&rx.value),
            "{before} <= {} <= {after}",
            rx.value
        );
        for name in COUNTERS {
            assert!(find(&o, &format!("lo_{name}")).value >= 0.0);
        }
        assert!(!o.metrics.iter().any(|m| m.name.ends_with("_per_s")));
        assert!(o.output.contains("rates from the next run"), "{}", o.output);

        // Make some loopback traffic, then measure its rate.
        tokio::time::sleep(MIN_RATE_WINDOW).await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(&[0u8; 256 * 1024]).unwrap();
        });
        let (mut conn, _) = listener.accept().unwrap();
        std::io::copy(&mut conn, &mut std::io::sink()).unwrap();
        sender.join().unwrap();

        let o = probes.run(&net(Some("lo"))).await;
        let rate = find(&o, "lo_rx_bytes_per_s");
        assert_eq!(rate.unit.as_deref(), Some("B/s"));
        // 256 KiB in a window of a little over a second.
        assert!(rate.value >= 256.0 * 1024.0 / 10.0, "{rate:?}");
        assert_eq!(find(&o, "lo_rx_packets_per_s").unit.as_deref(), Some("/s"));
        assert!(o.output.contains("/s"), "{}", o.output);
    }

    #[tokio::test]
    async fn all_interfaces_but_loopback_by_default() {
        let o = SystemProbes::new().run(&net(None)).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(
            !o.metrics.iter().any(|m| m.name.starts_with("lo_")),
            "{:?}",
            o.metrics
        );
        let others: Vec<String> = sys_interfaces().into_iter().filter(|n| n != "lo").collect();
        for name in &others {
            let m = find(&o, &format!("{name}_tx_bytes"));
            assert!(m.value <= sys_counter(name, "tx_bytes") as f64, "{m:?}");
        }
        if others.is_empty() {
            assert!(
                o.output.contains("no interfaces but loopback"),
                "{}",
                o.output
            );
        }
    }

    #[test]
    fn rates_need_a_second_and_skip_counter_resets() {
        let mut samples = HashMap::new();
        let t0 = Instant::now();
        let mut i = Interface {
            name: "eth9".into(),
            counters: [1000, 2000, 10, 20, 0, 0],
            state: InterfaceOperationalState::Up,
            loopback: false,
        };
        assert_eq!(rates_for(&mut samples, &i, t0), None);
        i.counters = [2000, 1000, 20, 40, 1, 0];
        // Too soon: nothing yet to repeat.
        assert_eq!(
            rates_for(&mut samples, &i, t0 + Duration::from_millis(10)),
            None
        );
        let r = rates_for(&mut samples, &i, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(
            r,
            [
                Some(500.0),
                None,
                Some(5.0),
                Some(10.0),
                Some(0.5),
                Some(0.0)
            ]
        );
        // Too soon again: the same rates.
        i.counters = [9000, 9000, 90, 90, 9, 9];
        assert_eq!(
            rates_for(&mut samples, &i, t0 + Duration::from_millis(2500)),
            Some(r)
        );
    }
}
