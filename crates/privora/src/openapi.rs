//! `/api/openapi.json`: the REST endpoints described from the code (utoipa). Each handler
//! carries its own `#[utoipa::path]`; this module only gathers them.

use axum::Json;
use privora_protocol::Contact;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{api, metrics, web};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Privora",
        description = "REST endpoints of the Privora chat server. Every path is served both at `/` and \
                       under `/api/`. The chat itself runs over the WebSocket at `/ws` (see docs/protocol.md)."
    ),
    servers((url = "/api"), (url = "/")),
    paths(
        api::search_users,
        api::ws_test,
        api::healthz,
        api::readyz,
        web::config,
        web::dev_token,
        metrics::render,
        document,
    ),
    components(schemas(Contact, web::ClientConfig, web::DevTokenRequest, web::DevTokenResponse)),
    modifiers(&BearerToken),
)]
pub struct ApiDoc;

/// The `bearer` scheme the authenticated paths refer to: a Firebase ID token (or a development
/// token) in `Authorization: Bearer ...`.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build(),
            ),
        );
    }
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
