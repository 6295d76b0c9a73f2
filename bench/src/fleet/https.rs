//! A minimal HTTPS/1.1 client for the gateway's API: one kept-alive connection per
//! [`Client`], trusting the gateway's certificate pin, with the bearer token (and a JSON
//! body when one is given).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;

pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    token: String,
}

/// One answer: status, body, and the time from sending the request to its head (the
/// first byte) and to the whole body.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    pub first_byte: Duration,
    pub took: Duration,
}

impl Client {
    pub async fn connect(addr: SocketAddr, pin: &str, token: &str) -> Result<Client> {
        let config = outpost_agent::tls::client_config(&outpost_agent::settings::Trust::Pin(
            pin.to_string(),
        ))?;
        let tls = tokio_rustls::TlsConnector::from(config);
        let stream = super::loadgen::tls_connect(
            &tls,
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            addr,
        )
        .await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .context("HTTP handshake failed")?;
        tokio::spawn(conn);
        Ok(Client {
            sender,
            token: token.to_string(),
        })
    }

    pub async fn call(&mut self, method: &str, path: &str) -> Result<Answer> {
        self.send(method, path, None).await
    }

    /// [`Client::call`] with a JSON body.
    pub async fn call_json(
        &mut self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Answer> {
        self.send(method, path, Some(body)).await
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", self.token));
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(v)?)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body))?;
        self.sender
            .ready()
            .await
            .context("the API connection closed")?;
        let t0 = Instant::now();
        let resp = self
            .sender
            .send_request(req)
            .await
            .with_context(|| format!("{method} {path} failed"))?;
        let first_byte = t0.elapsed();
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow!("reading the answer to {method} {path}: {e}"))?
            .to_bytes();
        Ok(Answer {
            status,
            body,
            first_byte,
            took: t0.elapsed(),
        })
    }
}
