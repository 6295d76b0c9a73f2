//! Who may call what: one middleware turns the bearer token into a [`Caller`] (or 401),
//! and each handler names what it needs by taking one extractor ([`Tenant`] with a role,
//! or [`FleetOperator`]), which answers 403 otherwise. A tenant's caller only ever names
//! its own tenant's things: every lookup is made within [`Tenant::name`], so another
//! tenant's agent reads as absent (404), whatever its fingerprint.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, Services};
use crate::errors::ErrorKind;
use crate::listener::Peer;
use crate::tenants::{Caller, Refusal, Role};

/// Authenticate the bearer token; the handler's extractor decides what it may do.
pub async fn authenticate(
    State(gw): State<Arc<Services>>,
    mut req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return ApiError::new(
            ErrorKind::Unauthenticated,
            "missing API token: send 'Authorization: Bearer TOKEN' (an installation's first admin token is in api.token in the gateway's data directory)",
        )
        .into_response();
    };
    let what = || {
        let peer = req.extensions().get::<Peer>().map(|p| p.0.to_string());
        (format!("api {} {}", req.method(), req.uri().path()), peer)
    };
    match gw.credentials.tenants.authenticate(token.trim()) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(refusal) => {
            let tenant = match &refusal {
                Refusal::TenantDisabled(t) => t.as_str(),
                _ => "",
            };
            let (subject, peer) = what();
            gw.audit.refused(tenant, "api_token", subject, peer);
            ApiError::new(ErrorKind::Unauthenticated, refusal.to_string()).into_response()
        }
    }
}

/// A role a route needs.
pub trait Needs: Send + Sync + 'static {
    const ROLE: Role;
}
pub struct Read;
pub struct Operate;
pub struct Admin;
impl Needs for Read {
    const ROLE: Role = Role::Read;
}
impl Needs for Operate {
    const ROLE: Role = Role::Operate;
}
impl Needs for Admin {
    const ROLE: Role = Role::Admin;
}

/// A caller of a tenant whose token has at least role `N`.
pub struct Tenant<N> {
    pub name: String,
    _needs: PhantomData<N>,
}

/// What a request tried, and from where, for the audit.
fn what(parts: &Parts) -> (String, Option<String>) {
    let peer = parts.extensions.get::<Peer>().map(|p| p.0.to_string());
    (format!("api {} {}", parts.method, parts.uri.path()), peer)
}

fn caller(parts: &Parts) -> Result<&Caller, ApiError> {
    parts
        .extensions
        .get::<Caller>()
        .ok_or_else(|| ApiError::new(ErrorKind::Unauthenticated, "missing API token"))
}

impl<N: Needs> FromRequestParts<Arc<Services>> for Tenant<N> {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        gw: &Arc<Services>,
    ) -> Result<Self, Self::Rejection> {
        match caller(parts).map_err(IntoResponse::into_response)? {
            Caller::Tenant { tenant, role } if *role >= N::ROLE => Ok(Tenant {
                name: tenant.clone(),
                _needs: PhantomData,
            }),
            Caller::Tenant { tenant, role } => {
                let (subject, peer) = what(parts);
                gw.audit.refused(tenant, "role", subject, peer);
                Err(ApiError::new(
                    ErrorKind::Forbidden,
                    format!(
                        "this token's role is {}; this needs {} (or more)",
                        role.as_str(),
                        N::ROLE.as_str()
                    ),
                )
                .into_response())
            }
            Caller::Operator => Err(ApiError::new(
                ErrorKind::Forbidden,
                "the operator token manages tenants (/api/v1/tenants); a tenant's agents, keys and tokens need a token of that tenant",
            )
            .into_response()),
        }
    }
}

/// The fleet operator.
pub struct FleetOperator;

impl FromRequestParts<Arc<Services>> for FleetOperator {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        gw: &Arc<Services>,
    ) -> Result<Self, Self::Rejection> {
        match caller(parts).map_err(IntoResponse::into_response)? {
            Caller::Operator => Ok(FleetOperator),
            Caller::Tenant { tenant, .. } => {
                let (subject, peer) = what(parts);
                gw.audit.refused(tenant, "operator_only", subject, peer);
                Err(ApiError::new(
                    ErrorKind::Forbidden,
                    "only the fleet operator's token manages tenants",
                )
                .into_response())
            }
        }
    }
}
