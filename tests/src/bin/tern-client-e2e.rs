//! A minimal app around `tern_client::Client`, for tests that must kill a client
//! mid-stream: `tern-client-e2e <store dir>` opens the device in the store and prints
//! `msg <body>` for each message, confirming it only after the line is written out.

use std::io::Write;
use std::sync::Arc;

use tern_client::store::SledKv;
use tern_client::{Client, Event};

/// The storage key the end-to-end tests use for every device store.
const STORAGE_KEY: [u8; 32] = [7; 32];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: tern-client-e2e <store dir>")?;
    let store = Arc::new(SledKv::open(dir.as_ref(), &STORAGE_KEY)?);
    let (client, mut events) = Client::open(store).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    while let Some(event) = events.recv().await {
        if let Event::Message(m) = event {
            writeln!(out, "msg {}", String::from_utf8_lossy(&m.body))?;
            out.flush()?;
            client.confirm(m.seq).await?;
        }
    }
    Ok(())
}
