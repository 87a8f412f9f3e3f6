//! The running server's admin API, as the CLI's `--server` commands call it.

use serde_json::Value;

/// Calls the admin API of `server`.
pub fn call(server: &str, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let token = std::env::var("SWITCHYARD_ADMIN_TOKEN")
        .map_err(|_| "set SWITCHYARD_ADMIN_TOKEN to use --server".to_string())?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("{}{path}", server.trim_end_matches('/'));
        let mut req = if method == "GET" {
            client.get(&url)
        } else {
            client.post(&url)
        };
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .bearer_auth(token)
            .timeout(std::time::Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| format!("cannot reach {server}: {e}"))?;
        let status = resp.status();
        let v: Value = resp.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {}", v["reason"].as_str().unwrap_or("")));
        }
        Ok(v)
    })
}
