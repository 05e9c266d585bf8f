//! Two people chatting end-to-end encrypted through a local relay, one per terminal.
//!
//! ```text
//! cargo run --release -p tern-relay -- serve                         # terminal 1: prints tern://…
//! cargo run -p tern-client --example chat -- tern://… ./alice        # terminal 2
//! cargo run -p tern-client --example chat -- tern://… ./bob          # terminal 3
//! ```
//!
//! Each prints its contact card. A second device of the same account (say Alice's
//! laptop) starts with an empty directory and `--join`
//! (`chat tern://… ./alice-laptop --join`): it prints a link and its QR code and
//! waits; type `/link tern-link:…` on Alice's primary to link it. Paste Alice's card into Bob's terminal as
//! `/add tern-contact:…`, then type: lines go to the current contact. Stop either side
//! (Ctrl-D or `/quit`) and start it again with the same directory: messages sent
//! meanwhile arrive, and nothing is lost or shown twice.
//!
//! Commands: `/add <card>`, `/card`, `/file <path>` (send an attachment; received ones
//! land in `<dir>/downloads/`), `/forward` (the last received attachment, to the current
//! contact, without uploading it again), `/safety`, `/accept`, `/help`, `/quit`, and:
//! - `/verify <number>` (E.164, say `+12015550123`): the relay sends the number a
//!   code and the chat prints the session id (hex); `/code <session> <code>`
//!   confirms it, verifying the number (the relay keeps only its discovery tag);
//!   `/code <session> <code> hidden` verifies it without making it discoverable.
//!   With `tern-relay serve --allow-dev-verifier` and `verifier = "dev-file"`, the
//!   code is in the relay's `<data>/dev-verification/<session>`.
//! - `/discover <numbers…>` (separated by commas, or by spaces if there is no comma) or
//!   `/discover @<file>` (one number per line): which are discoverable users; they
//!   become contacts, the first one found the current contact if there is none.
//!   National formats are read in the region of `TERN_REGION` (default `US`). Needs a
//!   verified number.
//! - `/export [--ciphertexts]`: everything the relay holds about this account, as JSON
//!   in `<dir>/export-<time>.json`.
//! - `/delete-account confirm`: deletes the account on the relay and this device's
//!   store, then quits.
//! - `/link <tern-link:…>` (primary only): links the device that shows the link.
//!   `/devices` lists this account's devices; `/remove-device <n>` (primary only)
//!   removes device n. The new device makes the link (it holds the keys the link
//!   carries), so joining takes the relay address (`--join`), not a link.
//!
//! - Groups: `/group new <name> <ids…>` (contacts by the short id the chat prints)
//!   creates a group and makes it current; typed lines then go to it. `/group add
//!   <ids…>`, `/group remove <id>` and `/group leave` act on the current group;
//!   `/groups` lists them; `/to <name>` talks in a group, `/to <id>` to a contact.
//!   `/group rename <group> <name>`, `/group describe <group> <text>` and `/group
//!   picture <group> <file>` change a group's name, description and picture (the
//!   picture is uploaded as an attachment); every member sees the change.
//! - `/broadcast <id,id,…> <text>`: one upload to several contacts, each of whom
//!   sees an ordinary message.
//!
//! The device store is encrypted with a key kept in `<dir>/storage.key`; a real app
//! keeps that key in the platform's keystore instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use tern_client::store::SledKv;
use tern_client::{Client, ContactCard, Event, Events, GroupChange, GroupId, VerificationId};
use tern_proto::{AccountId, DeviceId, RelayAddress};
use tokio::io::{AsyncBufReadExt, BufReader};

type BoxError = Box<dyn std::error::Error>;

/// What `/help` prints.
const HELP: &str = "\
/add <card>                  pick a contact by its card
/card                        print your card
/file <path>                 send an attachment
/forward                     pass the last attachment on
/safety, /accept             safety number; accept a changed identity key
/verify <+number>            send a code to your number; prints the session
/code <session> <code> [hidden]  confirm the code (hidden: not discoverable)
/discover <numbers…|@file>   which numbers are discoverable users
/export [--ciphertexts]      what the relay holds about you, as JSON
/delete-account confirm      delete this account for good
/link <tern-link:…>          link the device that shows this link (primary)
/devices                     this account's devices
/remove-device <n>           remove device n (primary)
/group new <name> <ids…>     a group with these contacts (ids as printed); talk to it
/group add <ids…>            add contacts to the current group
/group remove <id>           remove a member from the current group
/group leave                 leave the current group
/group rename <group> <name>  rename a group
/group describe <group> <text>  set a group's description
/group picture <group> <file>   set a group's picture (uploaded as an attachment)
/groups                      your groups
/to <group name | id>        talk to a group (by name) or a contact (by id)
/broadcast <ids,…> <text>    one message to several contacts, uploaded once
/quit";

fn short(account: &AccountId) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&account.as_bytes()[..6])
}

/// Contacts this chat has seen, found again by the short id it prints.
fn resolve(known: &[AccountId], id: &str) -> Option<AccountId> {
    known.iter().copied().find(|a| short(a) == id)
}

/// Every id in `ids` resolved, or the first that is not known.
fn resolve_all<'a>(
    known: &[AccountId],
    ids: impl Iterator<Item = &'a str>,
) -> Result<Vec<AccountId>, String> {
    ids.map(|id| resolve(known, id).ok_or(format!("unknown contact {id}")))
        .collect()
}

/// What typed lines go to.
#[derive(Clone, Copy)]
enum Target {
    Contact(AccountId),
    Group(GroupId),
}

fn ids(accounts: &[AccountId]) -> String {
    accounts.iter().map(short).collect::<Vec<_>>().join(", ")
}

async fn group_name(client: &Client, id: &GroupId) -> String {
    match client.groups().await {
        Ok(groups) => groups
            .into_iter()
            .find(|g| g.id == *id)
            .map_or_else(|| "a group".into(), |g| g.name),
        Err(_) => "a group".into(),
    }
}

fn storage_key(dir: &Path) -> Result<[u8; 32], BoxError> {
    let path = dir.join("storage.key");
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok(bytes[..].try_into().map_err(|_| "storage.key is damaged")?);
    }
    let key: [u8; 32] = rand::random();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(&path)?, &key)?;
    Ok(key)
}

async fn start(relay: &RelayAddress, dir: &Path, join: bool) -> Result<(Client, Events), BoxError> {
    std::fs::create_dir_all(dir)?;
    let store = Arc::new(SledKv::open(&dir.join("device"), &storage_key(dir)?)?);
    match Client::open(store.clone()).await {
        Ok(started) => Ok(started),
        Err(tern_client::Error::NotRegistered) if join => {
            let joining = Client::join(relay, store).await?;
            println!(
                "link this device: on your primary device type\n/link {}",
                joining.link()
            );
            match qr(joining.link()) {
                Some(code) => println!("or scan:\n{code}"),
                None => println!("(the link is too long for a QR code)"),
            }
            println!("waiting for the primary (up to 10 minutes)…");
            Ok(joining.finish().await?)
        }
        Err(tern_client::Error::NotRegistered) => {
            println!("registering a new account on {relay}");
            Ok(Client::register(relay, store).await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// The link as a QR code in the terminal, two modules per character cell, light on
/// dark so it scans on a dark terminal.
fn qr(link: &str) -> Option<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::with_error_correction_level(link, qrcode::EcLevel::L).ok()?;
    Some(
        code.render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
    )
}

/// A verification session id as `/verify` printed it: 32 hex digits.
fn session(hex: &str) -> Option<VerificationId> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(VerificationId(id))
}

/// The numbers of `/discover`'s arguments: `@file` (one per line), or a list.
fn book(args: &str) -> std::io::Result<Vec<String>> {
    let text = match args.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path.trim())?,
        None if args.contains(',') => args.replace(',', "\n"),
        None => args.split_whitespace().collect::<Vec<_>>().join("\n"),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (relay, dir, join) = match &args[..] {
        [relay, dir] => (relay, dir, false),
        [relay, dir, flag] if flag == "--join" => (relay, dir, true),
        _ => {
            eprintln!(
                "usage: chat tern://<fingerprint>@host:port[,host:port…] <directory> [--join]"
            );
            std::process::exit(2);
        }
    };
    let relay: RelayAddress = relay.parse()?;
    let (client, mut events) = start(&relay, &PathBuf::from(dir), join).await?;
    println!("you are {}", short(&client.account()));
    println!("your card: {}", client.contact_card().await);
    println!("type /add <card> to pick a contact, then type to talk; /help for commands");

    let mut peer: Option<AccountId> = None;
    let mut group: Option<GroupId> = None;
    let mut known: Vec<AccountId> = Vec::new();
    let mut last_attachment = None;
    let downloads = PathBuf::from(dir).join("downloads");
    let cache = PathBuf::from(dir).join("cache");
    std::fs::create_dir_all(&downloads)?;
    std::fs::create_dir_all(&cache)?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Message(m)) => {
                    match m.sent_to {
                        // Sent from another device of this account.
                        Some(to) => println!("[you → {}] {}", short(&to), String::from_utf8_lossy(&m.body)),
                        None => println!("[{}] {}", short(&m.sender), String::from_utf8_lossy(&m.body)),
                    }
                    for a in &m.attachments {
                        let name = Path::new(&a.file_name)
                            .file_name()
                            .map_or_else(|| "attachment".into(), |n| n.to_string_lossy().into_owned());
                        let dest = downloads.join(name);
                        match client.download_attachment(a, &dest).await {
                            Ok(n) => println!("    attachment: {} ({n} bytes)", dest.display()),
                            Err(e) => println!("    attachment not downloaded: {e}"),
                        }
                        last_attachment = Some(a.clone());
                    }
                    if m.unreadable_attachments > 0 {
                        println!(
                            "    {} attachment(s) this version cannot open (the sender's app is newer)",
                            m.unreadable_attachments
                        );
                    }
                    // Printed (and downloaded) is as far as this app stores messages.
                    client.confirm(m.seq).await?;
                    peer.get_or_insert(m.sender);
                    if !known.contains(&m.sender) {
                        known.push(m.sender);
                    }
                }
                Some(Event::GroupMessage(m)) => {
                    let name = group_name(&client, &m.group).await;
                    println!("[{name}] {}: {}", short(&m.sender), String::from_utf8_lossy(&m.body));
                    client.confirm(m.seq).await?;
                }
                Some(Event::GroupJoined { group: g, added_by, name }) => {
                    println!("(added to group {name:?} by {}; /to {name} to talk there)", short(&added_by));
                    group.get_or_insert(g);
                }
                Some(Event::GroupChanged { group: g, change }) => {
                    let name = group_name(&client, &g).await;
                    match change {
                        GroupChange::Added(a) => println!("({name}: {} joined)", ids(&a)),
                        GroupChange::Removed(a) => println!("({name}: {} left)", ids(&a)),
                        GroupChange::Left => println!("(you left a group)"),
                        GroupChange::RemovedSelf => println!("(you were removed from a group)"),
                        GroupChange::Renamed { name } => println!("(group {name:?}: its name, description or picture changed)"),
                        _ => {}
                    }
                }
                Some(Event::GroupIdentityMismatch { group: g, account }) => {
                    let name = group_name(&client, &g).await;
                    println!(
                        "!! {name}: a device claims to be {} under another identity key; refused (this device stops following the group until re-added)",
                        short(&account)
                    );
                }
                Some(Event::IdentityChanged { contact }) => println!(
                    "!! {}'s identity key changed: compare safety numbers (/safety), then /accept",
                    short(&contact)
                ),
                Some(Event::Connected) => println!("(connected)"),
                Some(Event::Disconnected { reason }) => println!("(disconnected: {reason}; retrying)"),
                Some(Event::SendFailed { reason, .. }) => println!("(not delivered: {reason})"),
                Some(Event::Dropped { reason }) => println!("(discarded a message: {reason})"),
                Some(Event::DeviceJoined { device }) => println!("(device {} joined this account)", device.get()),
                Some(Event::DeviceRemoved { device }) => println!("(device {} was removed)", device.get()),
                Some(Event::Removed) => {
                    println!("this device was removed from its account; start again with an empty directory");
                    break;
                }
                Some(_) => {}
                None => break,
            },
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let line = line.trim();
                if let Some(card) = line.strip_prefix("/add ") {
                    match card.parse::<ContactCard>() {
                        Ok(card) => {
                            client.add_contact(&card).await?;
                            peer = Some(card.account);
                            group = None;
                            if !known.contains(&card.account) {
                                known.push(card.account);
                            }
                            println!("talking to {}", short(&card.account));
                        }
                        Err(e) => println!("{e}"),
                    }
                } else if line == "/card" {
                    println!("{}", client.contact_card().await);
                } else if line == "/safety" {
                    match &peer {
                        Some(p) => println!(
                            "safety number: {}",
                            client.safety_number(p).await.unwrap_or_default()
                        ),
                        None => println!("no contact yet"),
                    }
                } else if line == "/accept" {
                    let changed = match &peer {
                        Some(p) => client.changed_identity(p).await.map(|c| (*p, c)),
                        None => None,
                    };
                    match changed {
                        Some((p, (key, number))) => {
                            println!("new safety number: {number}");
                            client.accept_identity(&p, &key).await?;
                            println!("accepted {}'s new identity key", short(&p));
                        }
                        None => println!("no identity change to accept"),
                    }
                } else if let Some(path) = line.strip_prefix("/file ") {
                    match &peer {
                        Some(p) => {
                            let path = Path::new(path.trim());
                            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                            let sealed = cache.join(format!("{}.sealed", name.clone().unwrap_or_default()));
                            match client.upload_attachment(path, &sealed).await {
                                Ok(pointer) => {
                                    client
                                        .send_with_attachments(p, name.unwrap_or_default().as_bytes(), &[pointer])
                                        .await?;
                                    let _ = std::fs::remove_file(&sealed);
                                    println!("(sent {})", path.display());
                                }
                                Err(e) => println!("(not sent: {e})"),
                            }
                        }
                        None => println!("no contact yet: /add <card>"),
                    }
                } else if line == "/forward" {
                    match (&peer, &last_attachment) {
                        (Some(p), Some(a)) => {
                            client.forward_attachment(p, b"(forwarded)", a).await?;
                            println!("(forwarded, nothing uploaded)");
                        }
                        _ => println!("no contact or no attachment received yet"),
                    }
                } else if let Some(number) = line.strip_prefix("/verify ") {
                    match client.start_verification(number.trim()).await {
                        Ok(id) => println!(
                            "(code sent; type /code {} <code>)",
                            id.to_hex()
                        ),
                        Err(e) => println!("(verification not started: {e})"),
                    }
                } else if let Some(args) = line.strip_prefix("/code ") {
                    let mut parts = args.split_whitespace();
                    let (Some(id), Some(code), hidden) = (
                        parts.next().and_then(session),
                        parts.next(),
                        parts.next(),
                    ) else {
                        println!("usage: /code <session, 32 hex digits> <6-digit code> [hidden]");
                        continue;
                    };
                    let confirmed = match hidden {
                        None => client.confirm_verification(id, code).await,
                        Some("hidden") => client.confirm_verification_with(id, code, false).await,
                        Some(_) => {
                            println!("usage: /code <session, 32 hex digits> <6-digit code> [hidden]");
                            continue;
                        }
                    };
                    match confirmed {
                        Ok(true) => println!("(verified; discoverable by your number)"),
                        Ok(false) => println!("(verified; not discoverable)"),
                        Err(e) => match e.attempts_left() {
                            Some(n) => println!("(wrong code; {n} attempts left)"),
                            None => println!("(not verified: {e})"),
                        },
                    }
                } else if let Some(args) = line.strip_prefix("/discover") {
                    let numbers = match book(args.trim()) {
                        Ok(n) => n,
                        Err(e) => {
                            println!("(cannot read the numbers: {e})");
                            continue;
                        }
                    };
                    let region = std::env::var("TERN_REGION").unwrap_or_else(|_| "US".into());
                    match client.discover(&numbers, &region).await {
                        Ok(report) => {
                            for (number, account) in &report.found {
                                println!("{number} uses Tern: {}", short(account));
                            }
                            for bad in &report.invalid {
                                println!("{bad:?} is not a phone number");
                            }
                            println!(
                                "({} found of {} numbers; {} newly evaluated)",
                                report.found.len(),
                                numbers.len(),
                                report.evaluated
                            );
                            if let (None, Some((_, account))) = (&peer, report.found.first()) {
                                peer = Some(*account);
                                println!("talking to {}", short(account));
                            }
                        }
                        Err(e) => println!("(discovery failed: {e})"),
                    }
                } else if let Some(args) = line.strip_prefix("/export") {
                    let ciphertexts = args.trim() == "--ciphertexts";
                    let millis = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis());
                    let dest = PathBuf::from(dir).join(format!("export-{millis}.json"));
                    match client.export_account(&dest, ciphertexts).await {
                        Ok(n) => println!("(exported {n} bytes to {})", dest.display()),
                        Err(e) => println!("(export failed: {e})"),
                    }
                } else if let Some(args) = line.strip_prefix("/delete-account") {
                    if args.trim() != "confirm" {
                        println!("this deletes the account for good: type /delete-account confirm");
                        continue;
                    }
                    match client.delete_account().await {
                        Ok(()) => {
                            println!("account deleted; this device's store is empty");
                            return Ok(());
                        }
                        Err(e) => println!("(not deleted: {e})"),
                    }
                } else if let Some(link) = line.strip_prefix("/link ") {
                    match client.link_device(link.trim()).await {
                        Ok(linked) => println!("(linked as device {}; it finishes joining on its own)", linked.id.get()),
                        Err(e) => println!("(not linked: {e})"),
                    }
                } else if line == "/devices" {
                    match client.devices().await {
                        Ok(devices) => {
                            for d in devices {
                                let primary = if d.primary { " (primary)" } else { "" };
                                let this = if d.this_device { " (this device)" } else { "" };
                                println!("device {}{primary}{this}", d.id.get());
                            }
                        }
                        Err(e) => println!("(cannot list devices: {e})"),
                    }
                } else if let Some(n) = line.strip_prefix("/remove-device ") {
                    let Some(id) = n.trim().parse().ok().and_then(DeviceId::new) else {
                        println!("usage: /remove-device <device number, see /devices>");
                        continue;
                    };
                    match client.remove_device(id).await {
                        Ok(()) => println!("(device {} removed)", id.get()),
                        Err(e) => println!("(not removed: {e})"),
                    }
                } else if let Some(args) = line.strip_prefix("/group new ") {
                    let mut words = args.split_whitespace();
                    let Some(name) = words.next() else {
                        println!("usage: /group new <name> <ids…>");
                        continue;
                    };
                    match resolve_all(&known, words) {
                        Ok(members) => match client.create_group(name, &members).await {
                            Ok(g) => {
                                group = Some(g);
                                println!("(group {name:?} created; typing goes there)");
                            }
                            Err(e) => println!("(not created: {e})"),
                        },
                        Err(e) => println!("{e}"),
                    }
                } else if let Some(args) = line.strip_prefix("/group add ") {
                    let Some(g) = group else {
                        println!("no current group: /to <group>");
                        continue;
                    };
                    match resolve_all(&known, args.split_whitespace()) {
                        Ok(members) => match client.add_members(&g, &members).await {
                            Ok(()) => println!("(adding)"),
                            Err(e) => println!("(not added: {e})"),
                        },
                        Err(e) => println!("{e}"),
                    }
                } else if let Some(id) = line.strip_prefix("/group remove ") {
                    let (Some(g), Some(member)) = (group, resolve(&known, id.trim())) else {
                        println!("usage: /group remove <id>, with a current group");
                        continue;
                    };
                    match client.remove_member(&g, &member).await {
                        Ok(()) => println!("(removing)"),
                        Err(e) => println!("(not removed: {e})"),
                    }
                } else if line == "/group leave" {
                    let Some(g) = group.take() else {
                        println!("no current group");
                        continue;
                    };
                    match client.leave_group(&g).await {
                        Ok(()) => println!("(leaving)"),
                        Err(e) => println!("(not left: {e})"),
                    }
                } else if let Some(args) = line
                    .strip_prefix("/group rename ")
                    .map(|a| ("rename", a))
                    .or_else(|| line.strip_prefix("/group describe ").map(|a| ("describe", a)))
                    .or_else(|| line.strip_prefix("/group picture ").map(|a| ("picture", a)))
                {
                    let (what, args) = args;
                    let Some((name, value)) = args.trim().split_once(' ') else {
                        println!("usage: /group {what} <group> <value>");
                        continue;
                    };
                    let Some(g) = client.groups().await?.into_iter().find(|g| g.name == name) else {
                        println!("no group {name}");
                        continue;
                    };
                    let done = match what {
                        "rename" => client.rename_group(&g.id, value.trim()).await,
                        "describe" => client.set_group_description(&g.id, value.trim()).await,
                        _ => {
                            let path = Path::new(value.trim());
                            let file = path.file_name().map(|n| n.to_string_lossy().into_owned());
                            let sealed = cache.join(format!("{}.sealed", file.unwrap_or_default()));
                            match client.upload_attachment(path, &sealed).await {
                                Ok(pointer) => {
                                    let _ = std::fs::remove_file(&sealed);
                                    client.set_group_picture(&g.id, Some(&pointer)).await
                                }
                                Err(e) => Err(e),
                            }
                        }
                    };
                    match done {
                        Ok(()) => println!("(changing {name}; the members will see it)"),
                        Err(e) => println!("(not changed: {e})"),
                    }
                } else if line == "/groups" {
                    for g in client.groups().await? {
                        println!("{} ({} members: {})", g.name, g.members.len(), ids(&g.members));
                        if !g.description.is_empty() {
                            println!("  {}", g.description);
                        }
                        if let Some(p) = &g.picture {
                            println!("  picture: {} bytes", p.size);
                        }
                    }
                } else if let Some(to) = line.strip_prefix("/to ") {
                    let to = to.trim();
                    if let Some(a) = resolve(&known, to) {
                        peer = Some(a);
                        group = None;
                        println!("talking to {to}");
                    } else if let Some(g) = client.groups().await?.into_iter().find(|g| g.name == to) {
                        group = Some(g.id);
                        println!("talking in {to}");
                    } else {
                        println!("no contact or group {to}");
                    }
                } else if let Some(args) = line.strip_prefix("/broadcast ") {
                    let Some((list, text)) = args.split_once(' ') else {
                        println!("usage: /broadcast <ids,…> <text>");
                        continue;
                    };
                    match resolve_all(&known, list.split(',')) {
                        Ok(to) => match client.send_broadcast(&to, text.as_bytes(), &[]).await {
                            Ok(_) => {}
                            Err(e) => println!("(not sent: {e})"),
                        },
                        Err(e) => println!("{e}"),
                    }
                } else if line == "/help" {
                    println!("{HELP}");
                } else if line == "/quit" {
                    break;
                } else if !line.is_empty() {
                    let target = group.map(Target::Group).or(peer.map(Target::Contact));
                    match target {
                        Some(Target::Group(g)) => {
                            if let Err(e) = client.send_group(&g, line.as_bytes(), &[]).await {
                                println!("(not sent: {e})");
                            }
                        }
                        Some(Target::Contact(p)) => {
                            client.send(&p, line.as_bytes()).await?;
                        }
                        None => println!("no contact yet: /add <card>"),
                    }
                }
            }
        }
    }
    client.shutdown().await;
    Ok(())
}
