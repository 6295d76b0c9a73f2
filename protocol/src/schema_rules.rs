//! The pieces of JSON Schema the protocol's types name in their `#[schemars(...)]`
//! attributes: patterns, and bounds derived from [`crate::limits`]. Kept apart from
//! [`crate::schema`], which generates the documents from the frames, so that the types can
//! use these without depending on the frames that contain them.

use schemars::Schema;
use serde_json::Value;

pub(crate) use crate::limits::MAX_SEQ as MAX_SAFE_INTEGER;

/// Visible text: none of the characters [`crate::fields::hidden`] refuses (controls,
/// bidirectional embeddings, overrides and isolates, zero-width characters, line and
/// paragraph separators, the byte-order mark).
pub(crate) const VISIBLE_TEXT: &str =
    r"^[^\u0000-\u001F\u007F-\u009F\u200B-\u200F\u2028-\u202E\u2060-\u206F\uFEFF]*$";

/// An agent fingerprint: a lowercase hyphenated UUID (`crate::valid_fingerprint`).
pub(crate) const FINGERPRINT: &str =
    "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

/// A check name (`crate::valid_check_name`; `.` and `..` are excluded separately).
pub(crate) const CHECK_NAME: &str = "^[A-Za-z0-9_.-]{1,64}$";

/// A collector name: check-name characters, short enough for `collector.NAME.metrics`.
pub(crate) const COLLECTOR_NAME: &str = "^[A-Za-z0-9_.-]{1,46}$";

/// A collectd plugin name.
pub(crate) const COLLECTD_PLUGIN: &str = "^[A-Za-z0-9_]{1,64}$";

/// An `http://` or `https://` URL with a host.
pub(crate) const HTTP_URL: &str = "^https?://[^/]";

/// Hex SHA-256, as catalog plugins are addressed.
pub(crate) const SHA256_HEX: &str = "^[0-9a-f]{64}$";

/// The configuration hash an agent states in `hello`.
pub(crate) const CONFIG_HASH: &str = "^[A-Za-z0-9:]{0,128}$";

/// An agent version (`crate::update::Version`): one to four dot-separated numbers.
pub(crate) const VERSION: &str = r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}$";

pub(crate) use crate::limits::MAX_FAULTS as FAULTS_PER_RESULT;

/// Longest base64 text of a catalog plugin of [`crate::MAX_PLUGIN_BYTES`].
pub(crate) const MAX_PLUGIN_B64: u64 = crate::MAX_PLUGIN_BYTES.div_ceil(3) * 4;

/// `not` this: the two names made of check-name characters that are not check names.
pub(crate) fn not_dots() -> Value {
    serde_json::json!({ "enum": [".", ".."] })
}

/// Labels in `hello`: at most [`crate::MAX_LABELS`], keys 1 to
/// [`crate::MAX_LABEL_KEY_BYTES`] and values at most [`crate::MAX_LABEL_VALUE_BYTES`] of
/// visible text.
pub(crate) fn labels(schema: &mut Schema) {
    schema.insert("maxProperties".into(), crate::MAX_LABELS.into());
    schema.insert(
        "propertyNames".into(),
        serde_json::json!({
            "minLength": 1,
            "maxLength": crate::MAX_LABEL_KEY_BYTES,
            "pattern": VISIBLE_TEXT,
        }),
    );
    schema.insert(
        "additionalProperties".into(),
        serde_json::json!({
            "type": "string",
            "maxLength": crate::MAX_LABEL_VALUE_BYTES,
            "pattern": VISIBLE_TEXT,
        }),
    );
}
