//! `group`: one message to a group of `devices` recipient devices through the
//! multi-recipient send, `messages` times: the sender's upload per message against
//! the target (the body once plus at most 64 bytes per recipient device),
//! the relay's data-directory growth per message (the body stored once), and the
//! fan-out latency from the send to each connected recipient's delivery.
//!
//! Recipients are single-device accounts, connected and acknowledging; the sender
//! sends on a connection that identifies no one, as clients do. The body is random
//! bytes of `size` standing for a group envelope (MLS encryption is the `groups`
//! criterion bench's).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use prost::Message;
use rand::RngCore;
use tern_client::identity::{DeviceKeyPair, IdentityKeyPair};
use tern_client::net::{Incoming, RelayConnection};
use tern_proto::{
    v1, AccountId, ClientRequest, DeviceId, MessageId, MultiSend, RecipientAccount, Request,
};
use tokio::sync::Mutex;

use super::modes::{relay_stats, RelayBefore};
use super::relay::RelayUnderTest;
use super::{percentiles, LoadError, Report};

/// What a `group` run does.
#[derive(Debug, Clone)]
pub struct GroupArgs {
    /// Recipient devices (one account each).
    pub devices: usize,
    /// Messages sent to all of them.
    pub messages: u64,
    /// Body bytes per message.
    pub size: usize,
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        total += match p.is_dir() {
            true => dir_bytes(&p),
            false => e.metadata().map_or(0, |m| m.len()),
        };
    }
    total
}

/// `group`: see the module docs.
pub async fn group(relay: &RelayUnderTest, args: &GroupArgs) -> Result<Report, LoadError> {
    let start = Instant::now();
    let address = relay.address.clone();
    // Recipients: registered, their delivery tokens set, connected.
    let recipients: Vec<(
        AccountId,
        [u8; 32],
        RelayConnection,
        tern_client::net::Inbox,
    )> = stream::iter(0..args.devices)
        .map(|_| {
            let address = address.clone();
            async move {
                let (conn, inbox) = RelayConnection::connect(&address).await?;
                let device = conn
                    .register(&IdentityKeyPair::generate(), &DeviceKeyPair::generate())
                    .await?;
                let mut token = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut token);
                conn.set_delivery_token(&token).await?;
                Ok::<_, LoadError>((device.account, token, conn, inbox))
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    eprintln!("{} recipients ready in {:?}", args.devices, start.elapsed());
    let accounts: Vec<RecipientAccount> = recipients
        .iter()
        .map(|(account, token, _, _)| RecipientAccount {
            account: *account,
            delivery_token: Bytes::copy_from_slice(token),
            device_list_version: 0,
            devices: vec![DeviceId::PRIMARY],
            parts: Vec::new(),
        })
        .collect();
    // Each recipient acknowledges what it gets and notes when (µs after `clock`).
    let clock = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for (_, _, conn, mut inbox) in recipients {
        let latencies = latencies.clone();
        let want = args.messages;
        readers.push(tokio::spawn(async move {
            let mut got = 0;
            while got < want {
                let Some(item) = inbox.recv().await else {
                    return Err::<(), LoadError>("a recipient's connection closed".into());
                };
                let Incoming::Delivery(d) = item? else {
                    continue;
                };
                let body = d.shared_body.unwrap_or_default();
                let sent_us = u64::from_be_bytes(body.get(..8).ok_or("short body")?.try_into()?);
                let now_us = clock.elapsed().as_micros() as u64;
                latencies.lock().await.push(now_us.saturating_sub(sent_us));
                drop(conn.ack(&[d.seq]));
                got += 1;
            }
            drop(conn);
            Ok(())
        }));
    }
    let (sender, _inbox) = RelayConnection::connect(&address).await?;
    let data_dir = relay.data_dir().map(Path::to_owned);
    let before = data_dir.as_deref().map_or(0, dir_bytes);
    let cpu_before = RelayBefore::now(relay);
    let mut upload = 0u64;
    let mut grown = 0u64;
    for i in 0..args.messages {
        let mut body = vec![0u8; args.size.max(16)];
        rand::thread_rng().fill_bytes(&mut body);
        body[..8].copy_from_slice(&(clock.elapsed().as_micros() as u64).to_be_bytes());
        body[8..16].copy_from_slice(&i.to_be_bytes());
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        let send = MultiSend {
            message_id: MessageId(id),
            body: body.into(),
            recipients: accounts.clone(),
        };
        // What goes on the wire for it: the request frame, encoded.
        let frame = v1::ClientFrame::from(ClientRequest {
            id: i + 1,
            request: Request::MultiSend(send.clone()),
        });
        upload += frame.encoded_len() as u64;
        let result = sender.multi_send(send).await?;
        if result.accepted as usize != args.devices {
            return Err(format!("{} of {} devices accepted", result.accepted, args.devices).into());
        }
        if i == 0 {
            // Growth from one message, before any acknowledgement can release it.
            grown = data_dir
                .as_deref()
                .map_or(0, dir_bytes)
                .saturating_sub(before);
        }
    }
    for r in readers {
        tokio::time::timeout(Duration::from_secs(120), r).await???;
    }
    let seconds = clock.elapsed().as_secs_f64();
    let mut lat = latencies.lock().await.clone();
    let (p50, p99, p999) = percentiles(&mut lat);
    let per_message = upload as f64 / args.messages as f64;
    let per_device = (per_message - args.size as f64) / args.devices as f64;
    let mut report = Report::rate("group", args.messages, args.size, seconds);
    (report.p50_us, report.p99_us, report.p999_us) = (p50, p99, p999);
    relay_stats(relay, &cpu_before, args.messages, &mut report);
    if report.relay_cpu_s > 0.0 {
        let deliveries = (args.messages * args.devices as u64) as f64;
        let us = report.relay_cpu_s * 1e6 / deliveries;
        report.extra.insert("relay_cpu_us_per_delivery".into(), us);
    }
    report.extra.insert("devices".into(), args.devices as f64);
    report
        .extra
        .insert("upload_bytes_per_message".into(), per_message);
    report
        .extra
        .insert("upload_bytes_per_device".into(), per_device);
    report
        .extra
        .insert("relay_data_growth_first_message_bytes".into(), grown as f64);
    // What each recipient's entry costs beyond the one body.
    let entry = (grown as f64 - args.size as f64) / args.devices as f64;
    report
        .extra
        .insert("relay_data_growth_per_device_bytes".into(), entry);
    Ok(report)
}
