use super::*;
use crate::probe::Probe;

fn hello() -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint: "0f8fad5b-d9cb-469f-a165-70867728950e".into(),
        credential: Credential::EnrollKey {
            key: "k".into(),
            proof: "p".into(),
        },
        agent_version: "0.1.0".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        hostname: "web-1".into(),
        labels: [("role".to_string(), "web".to_string())].into(),
        groups: vec!["eu".into()],
        config_hash: None,
        features: vec![],
    }
}

#[test]
fn frames_are_tagged_by_type() {
    let text = encode(&AgentFrame::Hello(hello()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["type"], "hello");
    assert_eq!(v["credential"]["kind"], "enroll_key");
    assert_eq!(
        decode_agent_frame(&text).unwrap(),
        AgentFrame::Hello(hello())
    );
}

#[test]
fn unknown_type_and_unknown_fields_degrade_politely() {
    assert_eq!(
        decode_agent_frame(r#"{"type":"telemetry_v9","x":1}"#).unwrap(),
        AgentFrame::Unknown
    );
    let mut v = serde_json::to_value(AgentFrame::Bye(Bye::stopping("stop"))).unwrap();
    v["added_in_v2"] = serde_json::json!(true);
    assert_eq!(
        decode_agent_frame(&v.to_string()).unwrap(),
        AgentFrame::Bye(Bye::stopping("stop"))
    );
}

#[test]
fn a_bye_says_whether_the_agent_comes_back() {
    // An older agent's bye has no window: a deregistration.
    assert_eq!(
        decode_agent_frame(r#"{"type":"bye","reason":"agent stopping"}"#).unwrap(),
        AgentFrame::Bye(Bye::stopping("agent stopping"))
    );
    let text = encode(&AgentFrame::Bye(Bye::stopping("x")));
    assert!(!text.contains("back_within_secs"), "{text}");
    let restarting = AgentFrame::Bye(Bye {
        reason: "restarting for an update".into(),
        back_within_secs: Some(120),
    });
    let text = encode(&restarting);
    assert!(text.contains(r#""back_within_secs":120"#), "{text}");
    assert_eq!(decode_agent_frame(&text).unwrap(), restarting);
}

#[test]
fn malformed_and_oversized_frames_are_errors() {
    assert!(matches!(
        decode_agent_frame("{not json"),
        Err(FrameError::Malformed(_))
    ));
    assert!(matches!(
        decode_agent_frame(r#"{"type":"hello"}"#),
        Err(FrameError::Malformed(_))
    ));
    let big = format!(
        r#"{{"type":"bye","reason":"{}"}}"#,
        "x".repeat(MAX_FRAME_BYTES)
    );
    assert!(matches!(
        decode_agent_frame(&big),
        Err(FrameError::TooBig { .. })
    ));
}

#[test]
fn rpc_request_flattens_the_call() {
    let req = GatewayFrame::RpcRequest(RpcRequest {
        id: 7,
        call: RpcCall::RunCheck {
            check: "disk".into(),
        },
    });
    let text = encode(&req);
    assert_eq!(
        text,
        r#"{"type":"rpc_request","id":7,"method":"run_check","check":"disk"}"#
    );
    assert_eq!(decode_gateway_frame(&text).unwrap(), req);
}

#[test]
fn config_hash_ignores_order_and_sees_changes() {
    let a = CheckSpec::new(
        "a",
        Probe::Nagios(probe::Command {
            command: vec!["/bin/true".into()],
        }),
        60,
        10,
    );
    let mut b = a.clone();
    b.name = "b".into();
    assert_eq!(
        config_hash(&[a.clone(), b.clone()]),
        config_hash(&[b.clone(), a.clone()])
    );
    let mut b2 = b.clone();
    b2.interval_secs = 30;
    assert_ne!(config_hash(&[a.clone(), b]), config_hash(&[a, b2]));
}

#[test]
fn names_and_fingerprints_are_validated() {
    assert!(valid_check_name("disk_root-1.5"));
    for bad in ["", "..", "a/b", "a b", &"x".repeat(65)] {
        assert!(!valid_check_name(bad), "{bad:?}");
    }
    assert!(valid_fingerprint("0f8fad5b-d9cb-469f-a165-70867728950e"));
    for bad in [
        "0F8FAD5B-D9CB-469F-A165-70867728950E",
        "0f8fad5b-d9cb-469f-a165-70867728950",
        "../../../../etc/passwd-aaaaaaaaaaaaaaa",
    ] {
        assert!(!valid_fingerprint(bad), "{bad:?}");
    }
}

#[test]
fn status_follows_nagios_exit_codes() {
    assert_eq!(Status::from_exit_code(0), Some(Status::Ok));
    assert_eq!(Status::from_exit_code(3), Some(Status::Unknown));
    assert_eq!(Status::from_exit_code(4), None);
    assert_eq!(Status::Critical.code(), 2);
    assert_eq!(
        serde_json::to_string(&Status::Warning).unwrap(),
        r#""warning""#
    );
}

/// Found by the frames fuzz target: a metric value read back must be the value written,
/// through any number of hops (agent → gateway → bus → sinks each parse it), not one that
/// differs in its last digit.
#[test]
fn a_metric_value_survives_every_hop_exactly() {
    let text = include_str!("../../fuzz/regressions/frames/float-round-trip.json");
    let frame = decode_agent_frame(text).unwrap();
    let once = encode(&frame);
    let twice = encode(&decode_agent_frame(&once).unwrap());
    assert_eq!(once, twice);
    for v in [
        4.999_999_999_992e39,
        0.1 + 0.2,
        1e-310,
        f64::MAX,
        123_456.789_012_345_68,
    ] {
        let back: f64 = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(back.to_bits(), v.to_bits(), "{v:e}");
    }
}
