//! The console: one self-contained page at `/` that reads the API with the token from the
//! URL fragment (`/#token=...`, never sent to the server) or asks for it.
//!
//! Every response of the gateway's HTTP side carries [`security_headers`]: the page may
//! run only its own inline script and style (by hash), talk only to this gateway, and not
//! be framed by another site.

use std::sync::OnceLock;

use axum::http::{header, HeaderValue};
use axum::response::{Html, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};

const PAGE: &str = include_str!("console.html");

/// The console: one self-contained page (no external assets).
#[utoipa::path(get, path = "/", tag = "gateway", responses(
    (status = 200, description = "The page", content_type = "text/html", body = String),
))]
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// Add the headers that keep the console (and any other response) from being framed,
/// sniffed into another type, or made to run code it does not carry itself.
pub async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(content_security_policy()),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The policy, with the hashes of the page's one inline `<script>` and `<style>`.
fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            inline_hash(PAGE, "script"),
            inline_hash(PAGE, "style"),
        )
    })
}

/// `'sha256-…'` of the text inside the first `<tag>…</tag>` of `page`, or `'none'`.
fn inline_hash(page: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let Some(start) = page.find(&open).map(|i| i + open.len()) else {
        return "'none'".into();
    };
    let Some(len) = page[start..].find(&close) else {
        return "'none'".into();
    };
    let digest = Sha256::digest(&page.as_bytes()[start..start + len]);
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_pages_own_script_and_style_and_nothing_else() {
        let csp = content_security_policy();
        assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        // One script and one style block: a second one would not be allowed to run.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert_eq!(inline_hash("<p>", "script"), "'none'");
    }
}
