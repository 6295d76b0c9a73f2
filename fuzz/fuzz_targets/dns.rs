//! A DNS answer as the probe reads it: a message decoded by hickory, then judged by the
//! probe (answers shown, expected values looked for) for several record types.
#![no_main]
use hickory_resolver::proto::op::Message;
use outpost_agent::checks::net::dns::{judge, record_type};
use outpost_protocol::probe::DnsProbe;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::from_vec(data) else {
        return;
    };
    for t in ["A", "AAAA", "MX", "SRV", "TXT", "PTR", "CNAME", "NS"] {
        let probe: DnsProbe = serde_json::from_value(serde_json::json!({
            "name": "example.test",
            "record_type": t,
            "expect": ["192.0.2.1", "mail.example.test", "v=spf1"],
        }))
        .expect("a DNS probe");
        let rtype = record_type(t).expect("a record type");
        let _ = judge(
            &probe,
            (rtype, "example.test"),
            &message.answers,
            std::time::Duration::from_millis(3),
        );
    }
});
