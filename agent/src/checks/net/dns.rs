//! DNS probe: one lookup with hickory-resolver, against the system's resolvers
//! (`/etc/resolv.conf`, without `/etc/hosts`) or the given `server` (UDP, then TCP).
//!
//! OK when answers of the asked type come back and every `expect`ed value is among them;
//! CRITICAL for NXDOMAIN, no answer, an error code, no reply or a missing value. Metrics:
//! `time_ms` (against `warn_ms`/`crit_ms`) and `answers`.
//!
//! Values compare without case and trailing dots (IP addresses as addresses); an MX
//! answer also matches its exchange alone (`mail.example.com` for `10 mail.example.com`),
//! an SRV answer its `target:port` and its target.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use outpost_protocol::probe::DnsProbe;
use outpost_protocol::Status;

use super::Report;
use crate::checks::outcome::Outcome;

/// How long to wait for a given server's reply, per try.
const SERVER_TIMEOUT: Duration = Duration::from_secs(2);
/// Retries with a given server after the first try.
const SERVER_RETRIES: usize = 1;
/// Values shown on the output line; all are in the details.
const SHOWN_VALUES: usize = 8;

const TYPES: &[(&str, RecordType)] = &[
    ("A", RecordType::A),
    ("AAAA", RecordType::AAAA),
    ("CNAME", RecordType::CNAME),
    ("MX", RecordType::MX),
    ("NS", RecordType::NS),
    ("PTR", RecordType::PTR),
    ("SRV", RecordType::SRV),
    ("TXT", RecordType::TXT),
];

pub fn record_type(name: &str) -> Result<RecordType, String> {
    let wanted = name.trim();
    TYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(wanted))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = TYPES.iter().map(|(n, _)| *n).collect();
            format!(
                "record type {name:?} is not supported (one of {})",
                names.join(", ")
            )
        })
}

/// `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
fn server_addr(server: &str) -> Result<SocketAddr, String> {
    let s = server.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("DNS server {server:?} is not IP or IP:PORT"))
}

fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            let mut builder = Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            );
            let opts = builder.options_mut();
            opts.timeout = SERVER_TIMEOUT;
            opts.attempts = SERVER_RETRIES;
            builder
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?,
    };
    let opts = builder.options_mut();
    // Ask the DNS, not /etc/hosts; nothing is kept between runs anyway.
    opts.use_hosts_file = ResolveHosts::Never;
    opts.try_tcp_on_error = true;
    opts.cache_size = 0;
    builder
        .build()
        .map_err(|e| format!("cannot set up the resolver: {e}"))
}

/// How an answer is shown, and the forms an expected value may take to match it.
fn answer(data: &RData) -> Option<(String, Vec<String>)> {
    fn name(n: &Name) -> String {
        n.to_string().trim_end_matches('.').to_string()
    }
    let (shown, mut forms) = match data {
        RData::A(a) => (a.0.to_string(), vec![]),
        RData::AAAA(a) => (a.0.to_string(), vec![]),
        RData::CNAME(n) => (name(&n.0), vec![]),
        RData::NS(n) => (name(&n.0), vec![]),
        RData::PTR(n) => (name(&n.0), vec![]),
        RData::MX(mx) => (
            format!("{} {}", mx.preference, name(&mx.exchange)),
            vec![name(&mx.exchange)],
        ),
        RData::SRV(srv) => (
            format!(
                "{} {} {} {}",
                srv.priority,
                srv.weight,
                srv.port,
                name(&srv.target)
            ),
            vec![
                format!("{}:{}", name(&srv.target), srv.port),
                name(&srv.target),
            ],
        ),
        RData::TXT(txt) => (txt.to_string(), vec![]),
        _ => return None,
    };
    forms.push(shown.clone());
    Some((shown, forms))
}

/// The form values compare in: TXT as written, addresses as addresses, names without
/// case or a trailing dot.
fn normal(value: &str, rtype: RecordType) -> String {
    let v = value.trim();
    if rtype == RecordType::TXT {
        return v.to_string();
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return ip.to_string();
    }
    v.trim_end_matches('.').to_lowercase()
}

fn failure(e: &NetError, what: &str) -> String {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NXDomain =>
        {
            format!("{what}: NXDOMAIN (no such name)")
        }
        NetError::Dns(DnsError::NoRecordsFound(nr)) => {
            format!("{what}: no answer ({})", nr.response_code)
        }
        NetError::Dns(DnsError::ResponseCode(code)) => format!("{what}: server answered {code}"),
        NetError::Timeout => format!("{what}: no reply (timed out)"),
        other => format!("{what}: {other}"),
    }
}

pub async fn run(p: &DnsProbe) -> Outcome {
    let rtype = match record_type(&p.record_type) {
        Ok(t) => t,
        Err(why) => return Outcome::unknown(format!("DNS UNKNOWN - {why}")),
    };
    let server = match p.server.as_deref().map(server_addr).transpose() {
        Ok(s) => s,
        Err(why) => return Outcome::unknown(format!("DNS UNKNOWN - {why}")),
    };
    let resolver = match resolver(server) {
        Ok(r) => r,
        Err(why) => return Outcome::unknown(format!("DNS UNKNOWN - {why}")),
    };
    let name = p.name.trim();
    let what = match server {
        Some(addr) => format!("{name} {rtype} from {addr}"),
        None => format!("{name} {rtype}"),
    };
    let started = Instant::now();
    let looked_up = match (rtype, name.parse::<IpAddr>()) {
        // PTR for an address: ask for its reverse name.
        (RecordType::PTR, Ok(ip)) => resolver.lookup(Name::from(ip), rtype).await,
        _ => resolver.lookup(name, rtype).await,
    };
    let elapsed = started.elapsed();
    let lookup = match looked_up {
        Ok(l) => l,
        Err(e) => {
            let mut o = Outcome::critical(format!("DNS CRITICAL - {}", failure(&e, &what)));
            o.metrics.push(time_metric(elapsed, p));
            return o;
        }
    };
    judge(p, (rtype, &what), lookup.answers(), elapsed)
}

/// The outcome of a lookup of `rtype` (`what` names it) that got `records` in `elapsed`:
/// the answers of the asked type shown, the expected values looked for among them, the
/// time judged. Everything here comes from the DNS server's answer.
pub fn judge(
    p: &DnsProbe,
    (rtype, what): (RecordType, &str),
    records: &[Record],
    elapsed: Duration,
) -> Outcome {
    let mut r = Report::new("DNS");
    let answers: Vec<(String, Vec<String>)> = records
        .iter()
        .filter(|rec| rec.record_type() == rtype)
        .filter_map(|rec| answer(&rec.data))
        .collect();
    let values: Vec<&str> = answers.iter().map(|(shown, _)| shown.as_str()).collect();
    for rec in records {
        r.note(format!("{} {} {}", rec.name, rec.record_type(), rec.data));
    }
    if answers.is_empty() {
        r.say(format!("{what}: no {rtype} answer"));
        r.problem(Status::Critical, "no answer of the asked type");
    } else {
        let mut shown = values
            .iter()
            .take(SHOWN_VALUES)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if values.len() > SHOWN_VALUES {
            shown.push_str(&format!(" (+{} more)", values.len() - SHOWN_VALUES));
        }
        r.say(format!(
            "{what}: {shown} in {} ms",
            super::millis(elapsed).round()
        ));
    }
    let missing: Vec<&str> = p
        .expect
        .iter()
        .map(String::as_str)
        .filter(|wanted| {
            let wanted = normal(wanted, rtype);
            !answers
                .iter()
                .any(|(_, forms)| forms.iter().any(|f| normal(f, rtype) == wanted))
        })
        .collect();
    if !missing.is_empty() {
        r.problem(
            Status::Critical,
            format!(
                "expected {} not among the answers",
                missing
                    .iter()
                    .map(|m| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    r.time_ms("time_ms", "the lookup", elapsed, p.warn_ms, p.crit_ms);
    r.metric("answers", answers.len() as f64, None, None, None);
    r.finish()
}

fn time_metric(elapsed: Duration, p: &DnsProbe) -> outpost_protocol::Metric {
    outpost_protocol::Metric {
        name: "time_ms".into(),
        value: super::millis(elapsed),
        unit: Some("ms".into()),
        warn: p.warn_ms.map(|w| w.to_string()),
        crit: p.crit_ms.map(|c| c.to_string()),
        min: None,
        max: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::Message;
    use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME, MX, PTR, SRV, TXT};
    use hickory_resolver::proto::rr::Record;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr;
    use std::sync::Arc;
    use tokio::net::UdpSocket;

    type Zone = HashMap<(String, RecordType), Vec<RData>>;

    fn n(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn zone() -> Zone {
        let mut z: Zone = HashMap::new();
        z.insert(
            ("www.example.test".into(), RecordType::A),
            vec![
                RData::A(A(Ipv4Addr::new(192, 0, 2, 10))),
                RData::A(A(Ipv4Addr::new(192, 0, 2, 11))),
            ],
        );
        z.insert(
            ("www.example.test".into(), RecordType::AAAA),
            vec![RData::AAAA(AAAA(Ipv6Addr::new(
                0x2001, 0xdb8, 0, 0, 0, 0, 0, 1,
            )))],
        );
        z.insert(
            ("example.test".into(), RecordType::MX),
            vec![RData::MX(MX::new(10, n("mail.example.test.")))],
        );
        z.insert(
            ("example.test".into(), RecordType::TXT),
            vec![RData::TXT(TXT::new(vec!["v=spf1 -all".into()]))],
        );
        z.insert(
            ("alias.example.test".into(), RecordType::CNAME),
            vec![RData::CNAME(CNAME(n("www.example.test.")))],
        );
        z.insert(
            ("_imap._tcp.example.test".into(), RecordType::SRV),
            vec![RData::SRV(SRV::new(0, 5, 993, n("mail.example.test.")))],
        );
        z.insert(
            ("10.2.0.192.in-addr.arpa".into(), RecordType::PTR),
            vec![RData::PTR(PTR(n("www.example.test.")))],
        );
        z
    }

    /// A tiny authoritative responder on 127.0.0.1 (UDP): answers from `zone`, NOERROR
    /// with nothing for a known name without that type, NXDOMAIN for unknown names.
    async fn dns_server(zone: Zone) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(zone);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let Ok(request) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let mut response = Message::response(request.metadata.id, request.metadata.op_code);
                response.metadata.authoritative = true;
                response.metadata.recursion_desired = request.metadata.recursion_desired;
                response.add_queries(request.queries.clone());
                if let Some(q) = request.queries.first() {
                    let qname = q.name().to_string().trim_end_matches('.').to_lowercase();
                    match zone.get(&(qname.clone(), q.query_type())) {
                        Some(rdatas) => {
                            for rd in rdatas {
                                response.add_answer(Record::from_rdata(
                                    q.name().clone(),
                                    60,
                                    rd.clone(),
                                ));
                            }
                        }
                        None if qname == "broken.example.test" => {
                            response.metadata.response_code = ResponseCode::ServFail
                        }
                        None if zone.keys().any(|(name, _)| *name == qname) => {}
                        None => response.metadata.response_code = ResponseCode::NXDomain,
                    }
                }
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        addr
    }

    fn probe(name: &str, record_type: &str, server: SocketAddr) -> DnsProbe {
        DnsProbe {
            name: name.into(),
            record_type: record_type.into(),
            server: Some(server.to_string()),
            expect: Vec::new(),
            warn_ms: None,
            crit_ms: None,
        }
    }

    #[test]
    fn definitions() {
        assert_eq!(record_type("aaaa").unwrap(), RecordType::AAAA);
        assert!(record_type("SOA").unwrap_err().contains("one of A, AAAA"));
        assert_eq!(
            server_addr("10.0.0.1").unwrap(),
            "10.0.0.1:53".parse().unwrap()
        );
        assert_eq!(
            server_addr("10.0.0.1:5353").unwrap(),
            "10.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            server_addr("[::1]:54").unwrap(),
            "[::1]:54".parse().unwrap()
        );
        assert_eq!(server_addr("::1").unwrap(), "[::1]:53".parse().unwrap());
        assert!(server_addr("dns.example").is_err());
        assert_eq!(
            normal("WWW.Example.TEST.", RecordType::CNAME),
            "www.example.test"
        );
        assert_eq!(normal("2001:DB8:0::1", RecordType::AAAA), "2001:db8::1");
        assert_eq!(normal("Mixed Case", RecordType::TXT), "Mixed Case");
    }

    #[tokio::test]
    async fn answers_and_expectations() {
        let server = dns_server(zone()).await;
        let mut p = probe("www.example.test", "A", server);
        p.expect = vec!["192.0.2.11".into(), "192.0.2.10".into()];
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(
            o.output.starts_with(&format!(
                "DNS OK - www.example.test A from {server}: 192.0.2.10, 192.0.2.11 in "
            )),
            "{}",
            o.output
        );
        assert_eq!(
            o.metrics
                .iter()
                .find(|m| m.name == "answers")
                .unwrap()
                .value,
            2.0
        );

        p.expect = vec!["192.0.2.10".into(), "192.0.2.99".into()];
        let o = run(&p).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output
                .ends_with("expected \"192.0.2.99\" not among the answers"),
            "{}",
            o.output
        );
        // What came back is listed.
        assert!(o.output.contains("192.0.2.10, 192.0.2.11"), "{}", o.output);

        let mut p = probe("www.example.test.", "AAAA", server);
        p.expect = vec!["2001:0db8::1".into()];
        assert_eq!(run(&p).await.status, Status::Ok);

        let mut p = probe("example.test", "MX", server);
        p.expect = vec!["mail.example.test".into()];
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
        assert!(
            o.output.contains(": 10 mail.example.test in"),
            "{}",
            o.output
        );
        p.expect = vec!["10 MAIL.example.test.".into()];
        assert_eq!(run(&p).await.status, Status::Ok);

        let mut p = probe("example.test", "TXT", server);
        p.expect = vec!["v=spf1 -all".into()];
        assert_eq!(run(&p).await.status, Status::Ok);

        let mut p = probe("alias.example.test", "CNAME", server);
        p.expect = vec!["www.example.test".into()];
        assert_eq!(run(&p).await.status, Status::Ok);

        let mut p = probe("_imap._tcp.example.test", "SRV", server);
        p.expect = vec!["mail.example.test:993".into()];
        assert_eq!(run(&p).await.status, Status::Ok);

        let mut p = probe("192.0.2.10", "PTR", server);
        p.expect = vec!["www.example.test".into()];
        let o = run(&p).await;
        assert_eq!(o.status, Status::Ok, "{o:?}");
    }

    #[tokio::test]
    async fn nxdomain_and_no_answer_are_critical() {
        let server = dns_server(zone()).await;
        let o = run(&probe("nope.example.test", "A", server)).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output.ends_with("NXDOMAIN (no such name)"),
            "{}",
            o.output
        );

        let o = run(&probe("example.test", "A", server)).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(o.output.ends_with("no answer (No Error)"), "{}", o.output);

        let o = run(&probe("broken.example.test", "A", server)).await;
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            o.output.ends_with("server answered Server Failure"),
            "{}",
            o.output
        );
    }

    #[tokio::test]
    async fn a_silent_server_is_not_ok_within_the_timeout() {
        // Bound, so nothing is refused: it just never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let started = Instant::now();
        let o = tokio::time::timeout(
            Duration::from_secs(20),
            run(&probe("www.example.test", "A", addr)),
        )
        .await
        .expect("the probe must give up on its own");
        assert_eq!(o.status, Status::Critical, "{o:?}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
        drop(silent);
    }

    #[tokio::test]
    async fn bad_definitions_are_unknown() {
        let server = "127.0.0.1:9".parse().unwrap();
        assert_eq!(
            run(&probe("x.test", "SOA", server)).await.status,
            Status::Unknown
        );
        let mut p = probe("x.test", "A", server);
        p.server = Some("not-an-ip".into());
        assert_eq!(run(&p).await.status, Status::Unknown);
    }
}
