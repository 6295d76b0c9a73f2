//! The API's contract: an OpenAPI 3.1 document at `/api/v1/openapi.json`, made from the
//! code. Every route the gateway serves is registered through utoipa-axum's `routes!`,
//! which takes the path, method, parameters and answers from the handler's own
//! `#[utoipa::path]`: a route cannot be served without being in the document, nor be
//! documented at another path than the one it is served at. The protocol's types (a
//! check, a result) are described by the JSON Schemas the protocol crate derives
//! (schemars), the very ones agents' frames are checked against, so the API's description
//! of them cannot drift from the wire's either.

use std::borrow::Cow;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Outpost gateway API",
        description = "The gateway's HTTP API. Under `/api/v1`, every call needs `Authorization: Bearer TOKEN`: a tenant's API token, whose role (`read` < `operate` < `admin`, each including the ones before) each operation names, or the fleet operator's token for `/api/v1/tenants`. A token reaches its own tenant's things only: another tenant's agent reads as absent (404). Every answer other than 2xx is `{\"error\": \"what went wrong, and the fix\"}`.",
    ),
    modifiers(&Bearer),
    components(schemas(ErrorBody)),
    tags(
        (name = "agents", description = "Agents, their checks, results and history"),
        (name = "events", description = "The live event stream"),
        (name = "alerting", description = "Alerts, silences, acknowledgements"),
        (name = "admin", description = "Enrollment keys, API tokens, tenants"),
        (name = "gateway", description = "Health, metrics, the console, the agents' endpoint"),
        (name = "releases", description = "Agent releases and the install script"),
    )
)]
pub struct ApiDoc;

/// Every answer other than 2xx (and the agents' websocket refusals).
#[derive(ToSchema)]
#[allow(dead_code)] // described, built by `ApiError`
pub struct ErrorBody {
    /// What went wrong, naming the fix.
    error: String,
}

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A tenant's API token (`at_…`) or the fleet operator's token",
                    ))
                    .build(),
            ),
        );
    }
}

/// A protocol type in the document by reference; [`finish`] puts in its schema.
macro_rules! protocol_ref {
    ($doc:ident, $name:literal) => {
        pub struct $doc;
        impl PartialSchema for $doc {
            fn schema() -> RefOr<Schema> {
                Ref::from_schema_name($name).into()
            }
        }
        impl ToSchema for $doc {
            fn name() -> Cow<'static, str> {
                $name.into()
            }
        }
    };
}

protocol_ref!(CheckResultDoc, "CheckResult");
protocol_ref!(CheckSpecDoc, "CheckSpec");

/// The document as served: utoipa's, with the protocol's own schemas.
pub fn finish(api: &utoipa::openapi::OpenApi) -> serde_json::Value {
    let mut doc = serde_json::to_value(api).expect("the document serializes");
    let mut generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    generator.subschema_for::<outpost_protocol::CheckResult>();
    generator.subschema_for::<outpost_protocol::CheckSpec>();
    for (name, schema) in generator.take_definitions(true) {
        doc["components"]["schemas"][name] = schema;
    }
    doc
}

static DOCUMENT: OnceLock<String> = OnceLock::new();

/// Keep the finished document to serve (the first router made wins: it is the same
/// for every router of this binary).
pub fn keep(api: &utoipa::openapi::OpenApi) {
    DOCUMENT.get_or_init(|| finish(api).to_string());
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "gateway",
    responses((status = 200, description = "The OpenAPI document (no token needed)", content_type = "application/json", body = Object))
)]
pub async fn document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.get().cloned().unwrap_or_else(|| "{}".into()),
    )
        .into_response()
}
