//! The JSON Schema of every frame, one per direction, generated from this crate's types so
//! it cannot drift from them.
//!
//! `docs/schema/agent-frame.schema.json` and `docs/schema/gateway-frame.schema.json` are
//! these schemas as committed: a unit test fails when they differ from what the types
//! generate (`OUTPOST_BLESS=1 cargo test -p outpost-protocol schema` rewrites them), and the
//! end-to-end suite (`tests/tests/schema.rs`) validates every frame both binaries send
//! against them.
//!
//! The schemas say what a peer may send and still be understood, which is serde's
//! deserializing view: a field with a default may be absent, a field the schema does not
//! name is allowed (a newer peer may add fields), and the `Unknown` catch-all variants are
//! left out. Those are how a receiver tolerates a frame type (or probe kind) it does not
//! know; describing them would make the schema accept any object with any `type`.
//!
//! Bounds are the protocol's own ([`crate::limits`], named in the types through
//! `schema_rules`).
//! A bound in bytes becomes `maxLength`, which counts characters: exact for ASCII, looser
//! than the byte rule for other text. This module is not a validator; the peers keep
//! enforcing their rules in code.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{Map, Value};

use crate::{AgentFrame, GatewayFrame};

/// The schema of every frame an agent sends (`hello`, `results`, `rpc_reply`,
/// `plugin_request`, `bye`), as JSON Schema draft 2020-12.
pub fn agent_frames() -> Value {
    root::<AgentFrame>(
        "Outpost agent frame",
        "A frame an agent sends to a gateway over the outpost.v1 websocket subprotocol (see docs/PROTOCOL.md). Generated from the outpost-protocol crate.",
    )
}

/// The schema of every frame a gateway sends (`welcome`, `config`, `ack`, `rpc_request`,
/// `plugin`, `error`, `reconnect`, `update`), as JSON Schema draft 2020-12.
pub fn gateway_frames() -> Value {
    root::<GatewayFrame>(
        "Outpost gateway frame",
        "A frame a gateway sends to an agent over the outpost.v1 websocket subprotocol (see docs/PROTOCOL.md). Generated from the outpost-protocol crate.",
    )
}

fn root<T: JsonSchema>(title: &str, description: &str) -> Value {
    let schema = SchemaSettings::draft2020_12()
        .for_deserialize()
        .into_generator()
        .into_root_schema_for::<T>();
    let mut value = schema.to_value();
    if let Value::Object(map) = &mut value {
        map.insert("title".into(), title.into());
        map.insert("description".into(), description.into());
    }
    tidy(value)
}

/// `value` with every object's keys in sorted order (so the committed text does not depend
/// on whether some crate in the build turned on serde_json's `preserve_order`) and its
/// descriptions, taken from doc comments, without rustdoc link targets.
fn tidy(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| match v {
                        Value::String(d) if k == "description" => (k, Value::String(plain(&d))),
                        v => (k, tidy(v)),
                    })
                    .collect::<Map<_, _>>(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(tidy).collect()),
        other => other,
    }
}

/// A doc comment's rustdoc links as plain code names: ``[`X`](crate::a::X)`` and
/// ``[`crate::X`]`` both read `` `X` ``.
fn plain(doc: &str) -> String {
    let mut out = String::with_capacity(doc.len());
    let mut rest = doc;
    while let Some(at) = rest.find("[`") {
        out.push_str(&rest[..at]);
        let Some(len) = rest[at + 2..].find("`]") else {
            break;
        };
        let name = &rest[at + 2..at + 2 + len];
        out.push('`');
        out.push_str(name.rsplit("::").next().unwrap_or(name));
        out.push('`');
        rest = &rest[at + 2 + len + 2..];
        if let Some(target) = rest.strip_prefix('(') {
            rest = target.split_once(')').map_or("", |(_, after)| after);
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A schema as it is committed: pretty-printed, ending with a newline.
    fn to_text(schema: &Value) -> String {
        let mut text = serde_json::to_string_pretty(schema).unwrap();
        text.push('\n');
        text
    }

    fn committed(file: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/schema")
            .join(file)
    }

    /// The `type` tags a schema accepts, in order.
    fn tags(schema: &Value) -> Vec<&str> {
        schema["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["properties"]["type"]["const"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn committed_schemas_are_what_the_types_generate() {
        let bless = std::env::var_os("OUTPOST_BLESS").is_some();
        let mut stale = Vec::new();
        for (file, schema) in [
            ("agent-frame.schema.json", agent_frames()),
            ("gateway-frame.schema.json", gateway_frames()),
        ] {
            let path = committed(file);
            let text = to_text(&schema);
            if bless {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &text).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(format!("docs/schema/{file}"));
            }
        }
        assert!(
            stale.is_empty(),
            "{} differ from what the protocol types generate; refresh them with\n\n    \
             OUTPOST_BLESS=1 cargo test -p outpost-protocol schema\n\nand commit the result",
            stale.join(" and ")
        );
    }

    #[test]
    fn every_frame_type_is_in_its_schema_and_no_catch_all() {
        assert_eq!(
            tags(&agent_frames()),
            ["hello", "results", "rpc_reply", "plugin_request", "bye"]
        );
        assert_eq!(
            tags(&gateway_frames()),
            [
                "welcome",
                "config",
                "ack",
                "rpc_request",
                "plugin",
                "error",
                "reconnect",
                "update"
            ]
        );
        let probe = &gateway_frames()["$defs"]["Probe"]["oneOf"];
        let kinds: Vec<&str> = probe
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["properties"]["kind"]["const"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, crate::probe::Probe::KINDS);
    }

    #[test]
    fn the_schema_carries_the_protocol_bounds() {
        let agent = agent_frames();
        let result = &agent["$defs"]["CheckResult"]["properties"];
        assert_eq!(result["seq"]["minimum"], 1);
        assert_eq!(result["seq"]["maximum"], 9_007_199_254_740_991_u64);
        assert_eq!(result["output"]["maxLength"], crate::MAX_OUTPUT_BYTES);
        assert_eq!(result["metrics"]["maxItems"], crate::MAX_METRICS);
        let batch = &agent["$defs"]["Results"]["properties"]["results"];
        assert_eq!(batch["minItems"], 1);
        assert_eq!(batch["maxItems"], crate::MAX_BATCH_RESULTS);
        let hello = &agent["$defs"]["Hello"]["properties"];
        assert_eq!(hello["hostname"]["maxLength"], crate::MAX_HOSTNAME_BYTES);
        assert_eq!(hello["labels"]["maxProperties"], crate::MAX_LABELS);
        assert_eq!(hello["groups"]["maxItems"], crate::MAX_GROUPS);
        let ack = &gateway_frames()["$defs"]["Ack"]["properties"]["seq"];
        assert_eq!(ack["maximum"], 9_007_199_254_740_991_u64);
        assert_eq!(crate::schema_rules::MAX_PLUGIN_B64, 699_052);
    }

    #[test]
    fn rustdoc_links_read_as_plain_names() {
        assert_eq!(
            plain("capped at [`MAX_X`](crate::limits::MAX_X)) and [`crate::MAX_Y`] or [a]"),
            "capped at `MAX_X`) and `MAX_Y` or [a]"
        );
        let text = to_text(&agent_frames()) + &to_text(&gateway_frames());
        assert!(!text.contains("crate::"), "{text}");
    }
}
