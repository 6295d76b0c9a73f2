//! The console: one self-contained page at `/` that reads the API with the token from the
//! URL fragment (`/#token=...`, never sent to the server) or asks for it.

use axum::response::Html;

pub async fn page() -> Html<&'static str> {
    Html(include_str!("console.html"))
}
