//! The CLI's view of the API: requests with the token, JSON answers, and API errors turned
//! into messages that say what to do.

use std::fmt;

use codemantle_control_plane::client::{Client, ClientError, Request, StreamingResponse};
use serde_json::Value;

use crate::settings::Settings;

/// A failed command.
#[derive(Debug)]
pub enum CliError {
    /// The server answered with an error.
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// No usable answer (connection, TLS, protocol).
    Transport(ClientError),
    /// Bad local input.
    Usage(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Api { .. } => 1,
            CliError::Usage(_) => 2,
            CliError::Transport(_) => 3,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Api {
                status,
                code,
                message,
            } => write!(f, "{message} ({code}, HTTP {status})"),
            CliError::Transport(e) => write!(f, "{e}"),
            CliError::Usage(m) => f.write_str(m),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Transport(e)
    }
}

pub struct Api {
    client: Client,
}

impl Api {
    pub fn new(settings: &Settings) -> Result<Api, String> {
        let client = Client::new(
            &settings.server,
            settings.token.clone(),
            settings.ca_cert.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        Ok(Api { client })
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.call(Request::new("GET", path)).await
    }

    /// A mutating call with an `Idempotency-Key`: retried (with the same key) if the
    /// connection fails, so a flaky network cannot apply it twice.
    pub async fn mutate(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> Result<Value, CliError> {
        let mut req = Request::new(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        let Some(key) = key else {
            return self.call(req).await;
        };
        req = req.header("idempotency-key", key);
        let mut attempt = 0;
        loop {
            match self.call(req.clone()).await {
                Err(CliError::Transport(ClientError::Io { .. } | ClientError::Timeout { .. }))
                    if attempt < 2 =>
                {
                    attempt += 1;
                    smol::Timer::after(std::time::Duration::from_millis(500 * attempt)).await;
                }
                other => return other,
            }
        }
    }

    /// Sends a device command (with an `Idempotency-Key`, retried with the same key if the
    /// connection fails) and returns the daemon's reply, also when it said `o:0` (HTTP 400
    /// with the reply as body), so the caller can show what the daemon refused.
    pub async fn device_reply(
        &self,
        path: &str,
        body: &Value,
        key: &str,
    ) -> Result<(u16, Value), CliError> {
        let req = Request::new("POST", path)
            .json(body)
            .header("idempotency-key", key);
        let mut attempt = 0;
        loop {
            match self.client.send(req.clone()).await {
                Ok(resp) => return reply_or_error(resp.status, resp.json(), &resp.text()),
                Err(ClientError::Io { .. } | ClientError::Timeout { .. }) if attempt < 2 => {
                    attempt += 1;
                    smol::Timer::after(std::time::Duration::from_millis(500 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn call(&self, req: Request) -> Result<Value, CliError> {
        let resp = self.client.send(req).await?;
        let body = resp.json();
        if (200..300).contains(&resp.status) {
            Ok(body)
        } else {
            Err(api_error(resp.status, &body, &resp.text()))
        }
    }

    /// Opens a streaming GET (SSE) and checks its status.
    pub async fn open_stream(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<StreamingResponse, CliError> {
        let mut req = Request::new("GET", path).header("accept", "text/event-stream");
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let mut stream = self.client.open(req).await?;
        if stream.status != 200 {
            let body = stream.read_to_end().await.unwrap_or_default();
            let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
            return Err(api_error(
                stream.status,
                &json,
                &String::from_utf8_lossy(&body),
            ));
        }
        Ok(stream)
    }
}

fn reply_or_error(status: u16, body: Value, raw: &str) -> Result<(u16, Value), CliError> {
    if (200..300).contains(&status) || (status == 400 && body["t"].is_string()) {
        Ok((status, body))
    } else {
        Err(api_error(status, &body, raw))
    }
}

fn api_error(status: u16, body: &Value, raw: &str) -> CliError {
    let code = body["error"].as_str().unwrap_or("http_error").to_owned();
    let message = body["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!(
                "unexpected answer: {}",
                raw.chars().take(200).collect::<String>()
            )
        });
    CliError::Api {
        status,
        code,
        message,
    }
}

/// A fresh random idempotency key for one CLI invocation.
pub fn new_idempotency_key() -> String {
    format!(
        "cli-{}",
        codemantle_control_plane::secrets::hex(&codemantle_control_plane::secrets::random_bytes::<
            16,
        >())
    )
}
