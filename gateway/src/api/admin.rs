//! The admin API: a tenant's enrollment keys and API tokens (its admins), and the tenants
//! themselves (the fleet operator). Keys and tokens are shown in clear once, in the answer
//! that creates them; lists show their ids and settings, never a hash.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::access::{Admin, FleetOperator, Tenant};
use super::openapi::ErrorBody;
use super::{ApiError, Gw};
use crate::errors::ErrorKind;
use crate::tenants::{AdminError, ApiToken, Caller, EnrollKey, Limits, NewKey, Role};

pub fn routes() -> OpenApiRouter<Gw> {
    OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(list_tenants, create_tenant))
        .routes(routes!(get_tenant, update_tenant, delete_tenant))
        .routes(routes!(create_tenant_token))
}

use super::json_body as body;

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> ApiError {
        let kind = match &e {
            AdminError::Exists(_) | AdminError::Conflict(_) => ErrorKind::Conflict,
            AdminError::NotFound(_) => ErrorKind::NotFound,
            AdminError::Store(_) => ErrorKind::Unavailable,
        };
        ApiError::new(kind, e.to_string())
    }
}

#[derive(Serialize, ToSchema)]
struct Whoami {
    /// `operator`, or the tenant's token role.
    #[schema(value_type = String)]
    role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<String>,
}

/// Who the token is: any valid token may ask.
#[utoipa::path(get, path = "/whoami", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, description = "The token's tenant and role", body = Whoami),
    (status = 401, description = "No valid token", body = ErrorBody),
))]
async fn whoami(Extension(caller): Extension<Caller>) -> Json<Whoami> {
    Json(match caller {
        Caller::Operator => Whoami {
            role: "operator",
            tenant: None,
        },
        Caller::Tenant { tenant, role } => Whoami {
            role: role.as_str(),
            tenant: Some(tenant),
        },
    })
}

#[derive(Serialize, ToSchema)]
struct KeyView {
    id: String,
    name: String,
    created_at_ms: u64,
    expires_at_ms: Option<u64>,
    max_enrollments: Option<u64>,
    enrollments: u64,
    labels: BTreeMap<String, String>,
    revoked_at_ms: Option<u64>,
}

impl From<EnrollKey> for KeyView {
    fn from(k: EnrollKey) -> KeyView {
        KeyView {
            id: k.id,
            name: k.name,
            created_at_ms: k.created_at_ms,
            expires_at_ms: k.expires_at_ms,
            max_enrollments: k.max_enrollments,
            enrollments: k.enrollments,
            labels: k.labels,
            revoked_at_ms: k.revoked_at_ms,
        }
    }
}

#[derive(Serialize, ToSchema)]
struct TokenView {
    id: String,
    name: String,
    role: Role,
    created_at_ms: u64,
    revoked_at_ms: Option<u64>,
}

impl From<ApiToken> for TokenView {
    fn from(t: ApiToken) -> TokenView {
        TokenView {
            id: t.id,
            name: t.name,
            role: t.role,
            created_at_ms: t.created_at_ms,
            revoked_at_ms: t.revoked_at_ms,
        }
    }
}

/// The tenant's enrollment keys (never the keys themselves). Role: admin.
#[utoipa::path(get, path = "/keys", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, description = "The keys", body = Vec<KeyView>),
    (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
))]
async fn list_keys(State(gw): State<Gw>, t: Tenant<Admin>) -> Json<Vec<KeyView>> {
    let keys = gw.credentials.tenants.list_keys(&t.name);
    Json(keys.into_iter().map(KeyView::from).collect())
}

#[derive(Serialize, ToSchema)]
struct CreatedKey {
    #[serde(flatten)]
    key: KeyView,
    /// The key in clear: shown only here.
    enroll_key: String,
}

/// A new enrollment key, shown in clear in this answer only. Role: admin.
#[utoipa::path(post, path = "/keys", tag = "admin", security(("bearer" = [])),
    request_body(content = Option<crate::tenants::NewKey>, description = "Its settings (all optional; no body: none)"),
    responses(
        (status = 201, description = "Made", body = CreatedKey),
        (status = 400, description = "A bad body", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
        (status = 503, description = "The change could not be stored: retry", body = ErrorBody),
))]
async fn create_key(State(gw): State<Gw>, t: Tenant<Admin>, bytes: Bytes) -> Response {
    let new: NewKey = match body(&bytes) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    if let Some(problem) = crate::tenants::key_problems(&new) {
        return ApiError::new(ErrorKind::BadRequest, problem).into_response();
    }
    match gw.credentials.tenants.create_key(&t.name, new).await {
        Ok((key, clear)) => {
            tracing::info!(tenant = %t.name, key = %key.id, "enrollment key created");
            let created = CreatedKey {
                key: key.into(),
                enroll_key: clear,
            };
            (StatusCode::CREATED, Json(created)).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Revoke an enrollment key (enrolled agents keep working). Role: admin.
#[utoipa::path(post, path = "/keys/{id}/revoke", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "Revoked", body = KeyView),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 409, description = "The change conflicts", body = ErrorBody),
        (status = 503, description = "The change could not be stored: retry", body = ErrorBody),
))]
async fn revoke_key(State(gw): State<Gw>, t: Tenant<Admin>, Path(id): Path<String>) -> Response {
    match gw.credentials.tenants.revoke_key(&t.name, &id).await {
        Ok(key) => {
            tracing::warn!(tenant = %t.name, key = %id, "enrollment key revoked");
            Json(KeyView::from(key)).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The tenant's API tokens (never the tokens themselves). Role: admin.
#[utoipa::path(get, path = "/tokens", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, description = "The tokens", body = Vec<TokenView>),
    (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
))]
async fn list_tokens(State(gw): State<Gw>, t: Tenant<Admin>) -> Json<Vec<TokenView>> {
    let tokens = gw.credentials.tenants.list_tokens(&t.name);
    Json(tokens.into_iter().map(TokenView::from).collect())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewToken {
    role: Role,
    #[serde(default)]
    #[schema(max_length = 200)]
    name: String,
}

#[derive(Serialize, ToSchema)]
struct CreatedToken {
    #[serde(flatten)]
    token: TokenView,
    /// The token in clear: shown only here.
    api_token: String,
}

async fn issue_token(gw: &Gw, tenant: &str, bytes: &[u8]) -> Response {
    let new: NewToken = match body(bytes) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    if new.name.len() > 200 {
        return ApiError::new(ErrorKind::BadRequest, "name: at most 200 bytes").into_response();
    }
    let created = gw
        .credentials
        .tenants
        .create_token(tenant, new.role, &new.name);
    match created.await {
        Ok((token, clear)) => {
            tracing::info!(%tenant, token = %token.id, role = token.role.as_str(), "API token created");
            let created = CreatedToken {
                token: token.into(),
                api_token: clear,
            };
            (StatusCode::CREATED, Json(created)).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// A new API token of the tenant, shown in clear in this answer only. Role: admin.
#[utoipa::path(post, path = "/tokens", tag = "admin", security(("bearer" = [])),
    request_body = NewToken,
    responses(
        (status = 201, description = "Made", body = CreatedToken),
        (status = 400, description = "A bad body", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 503, description = "The change could not be stored: retry", body = ErrorBody),
))]
async fn create_token(State(gw): State<Gw>, t: Tenant<Admin>, bytes: Bytes) -> Response {
    issue_token(&gw, &t.name, &bytes).await
}

/// Revoke an API token. Role: admin.
#[utoipa::path(post, path = "/tokens/{id}/revoke", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 200, description = "Revoked", body = TokenView),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
        (status = 404, description = "No such token", body = ErrorBody),
        (status = 409, description = "The change conflicts (the tenant's last admin token)", body = ErrorBody),
        (status = 503, description = "The change could not be stored: retry", body = ErrorBody),
))]
async fn revoke_token(State(gw): State<Gw>, t: Tenant<Admin>, Path(id): Path<String>) -> Response {
    match gw.credentials.tenants.revoke_token(&t.name, &id).await {
        Ok(token) => {
            tracing::warn!(tenant = %t.name, token = %id, "API token revoked");
            Json(TokenView::from(token)).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(Serialize, ToSchema)]
struct TenantView {
    name: String,
    enabled: bool,
    limits: Limits,
    created_at_ms: u64,
    /// Agents enrolled (revoked ones until forgotten).
    agents: u64,
    /// What the tenant takes now: only on `GET /api/v1/tenants/{name}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize, ToSchema)]
struct Usage {
    /// Bytes its results take on the bus (this gateway's embedded bus, or the fleet's
    /// NATS stream of the tenant).
    bus_bytes: u64,
}

fn tenant_view(gw: &Gw, t: crate::tenants::Tenant) -> TenantView {
    TenantView {
        agents: gw.registry.count(&t.name),
        name: t.name,
        enabled: t.enabled,
        limits: t.limits,
        created_at_ms: t.created_at_ms,
        usage: None,
    }
}

/// A 400 naming every problem of `limits`, if it has any.
fn limits_problems(limits: &Limits) -> Option<Response> {
    let problems = limits.problems();
    (!problems.is_empty())
        .then(|| ApiError::new(ErrorKind::BadRequest, problems.join("; ")).into_response())
}

/// Every tenant. The fleet operator only.
#[utoipa::path(get, path = "/tenants", tag = "admin", security(("bearer" = [])), responses(
    (status = 200, description = "The tenants", body = Vec<TenantView>),
    (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
))]
async fn list_tenants(State(gw): State<Gw>, _: FleetOperator) -> Json<Vec<TenantView>> {
    let all = gw.credentials.tenants.list_tenants();
    Json(all.into_iter().map(|t| tenant_view(&gw, t)).collect())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    /// Lowercase letters, digits and `-`, starting with a letter.
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$")]
    name: String,
    #[serde(default, deserialize_with = "super::object")]
    limits: Limits,
}

#[derive(Serialize, ToSchema)]
struct CreatedTenant {
    #[serde(flatten)]
    tenant: TenantView,
    /// The tenant's first admin token, in clear: shown only here.
    admin_token: String,
}

/// A new tenant, with its first admin token (in clear in this answer only). The fleet
/// operator only.
#[utoipa::path(post, path = "/tenants", tag = "admin", security(("bearer" = [])),
    request_body = NewTenant,
    responses(
        (status = 201, description = "Made", body = CreatedTenant),
        (status = 400, description = "A bad name, body or limit", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
        (status = 409, description = "A tenant of that name exists", body = ErrorBody),
        (status = 503, description = "The change could not be stored: retry", body = ErrorBody),
))]
async fn create_tenant(State(gw): State<Gw>, _: FleetOperator, bytes: Bytes) -> Response {
    let new: NewTenant = match body(&bytes) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = crate::tenant::parse_name(&new.name) {
        return ApiError::new(ErrorKind::BadRequest, format!("name: {e}")).into_response();
    }
    if let Some(bad) = limits_problems(&new.limits) {
        return bad;
    }
    let tenants = &gw.credentials.tenants;
    let tenant = match tenants.create_tenant(&new.name, new.limits).await {
        Ok(t) => t,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let first = tenants.create_token(&tenant.name, Role::Admin, "first admin token");
    match first.await {
        Ok((_, clear)) => {
            tracing::info!(tenant = %tenant.name, "tenant created");
            let created = CreatedTenant {
                tenant: tenant_view(&gw, tenant),
                admin_token: clear,
            };
            (StatusCode::CREATED, Json(created)).into_response()
        }
        Err(e) => {
            let why = format!("tenant {} was created, but its first admin token could not be: {e}; create one with POST /api/v1/tenants/{}/tokens", tenant.name, tenant.name);
            ApiError::new(ErrorKind::Unavailable, why).into_response()
        }
    }
}

/// One tenant, with what it keeps on the bus. The fleet operator only.
#[utoipa::path(get, path = "/tenants/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's name")),
    responses(
        (status = 200, description = "The tenant", body = TenantView),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
))]
async fn get_tenant(State(gw): State<Gw>, _: FleetOperator, Path(name): Path<String>) -> Response {
    match gw.credentials.tenants.tenant(&name) {
        Some(t) => {
            let mut view = tenant_view(&gw, t);
            match gw.bus.tenant_bytes(&name).await {
                Ok(bus_bytes) => view.usage = Some(Usage { bus_bytes }),
                Err(e) => {
                    tracing::warn!(tenant = %name, error = %e, "cannot tell what the tenant keeps on the bus")
                }
            }
            Json(view).into_response()
        }
        None => ApiError::from(AdminError::NotFound(format!("tenant {name}"))).into_response(),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TenantChange {
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "super::object_or_null")]
    limits: Option<Limits>,
}

/// Enable or disable a tenant, or change its limits. The fleet operator only.
#[utoipa::path(patch, path = "/tenants/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's name")),
    request_body(content = Option<TenantChange>, description = "What to change (no body: nothing)"),
    responses(
        (status = 200, description = "Changed", body = TenantView),
        (status = 400, description = "A bad body or limit", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 409, description = "The change conflicts", body = ErrorBody),
        (status = 503, description = "The change could not be stored: retry", body = ErrorBody),
))]
async fn update_tenant(
    State(gw): State<Gw>,
    _: FleetOperator,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let change: TenantChange = match body(&bytes) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Some(bad) = change.limits.as_ref().and_then(limits_problems) {
        return bad;
    }
    let updated = gw
        .credentials
        .tenants
        .update_tenant(&name, change.enabled, change.limits);
    match updated.await {
        Ok(t) => {
            tracing::info!(tenant = %name, enabled = t.enabled, limits = ?t.limits, "tenant changed");
            Json(tenant_view(&gw, t)).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Delete a disabled tenant: its agents, keys, tokens and results. The fleet operator only.
#[utoipa::path(delete, path = "/tenants/{name}", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 409, description = "The tenant is enabled, or a gateway's home tenant", body = ErrorBody),
        (status = 503, description = "Not all of it could be deleted: delete it again", body = ErrorBody),
))]
async fn delete_tenant(
    State(gw): State<Gw>,
    _: FleetOperator,
    Path(name): Path<String>,
) -> Response {
    let home = gw.credentials.tenants.tenant(&name).is_some_and(|t| t.home);
    if gw.credentials.home() == name || home {
        let why = format!("tenant {name} is a gateway's home tenant (--tenant): it holds the agents, key and token from before tenants, and cannot be deleted");
        return ApiError::new(ErrorKind::Conflict, why).into_response();
    }
    if gw
        .credentials
        .tenants
        .tenant(&name)
        .is_some_and(|t| t.enabled)
    {
        let why = format!("tenant {name} is enabled: disable it first (PATCH with {{\"enabled\": false}}), then delete it");
        return ApiError::new(ErrorKind::Conflict, why).into_response();
    }
    // Its agents first (revoked, closed wherever they are, and forgotten), so nothing of
    // the tenant comes back should a tenant of the same name be made later. A failure
    // stops here: the tenant stays (disabled), and deleting it again finishes.
    for rec in gw.registry.list(&name) {
        let agent = rec.agent();
        if let Err(e) = super::revoke(&gw, &agent).await {
            return e.into_response();
        }
        if let Err(e) = super::forget(&gw, &agent).await {
            return e.into_response();
        }
    }
    // Then its results, while the tenant (disabled) still exists to delete again.
    if gw.credentials.tenants.tenant(&name).is_some() {
        if let Err(e) = gw.bus.drop_tenant(&name).await {
            let why = format!("cannot delete tenant {name}'s results from the bus: {e}; the tenant stays (disabled): delete it again");
            return ApiError::new(ErrorKind::Unavailable, why).into_response();
        }
    }
    match gw.credentials.tenants.delete_tenant(&name).await {
        Ok(()) => {
            tracing::warn!(tenant = %name, "tenant deleted");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// A new token for a tenant, made by the operator (a tenant that lost its admin token).
#[utoipa::path(post, path = "/tenants/{name}/tokens", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "The tenant's name")),
    request_body = NewToken,
    responses(
        (status = 201, description = "Made", body = CreatedToken),
        (status = 400, description = "A bad body", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody), (status = 403, description = "The token may not do this (role too low, or not the operator's)", body = ErrorBody),
        (status = 404, description = "No such tenant", body = ErrorBody),
        (status = 503, description = "The change could not be stored: retry", body = ErrorBody),
))]
async fn create_tenant_token(
    State(gw): State<Gw>,
    _: FleetOperator,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    issue_token(&gw, &name, &bytes).await
}
