use std::path::PathBuf;

use super::*;
use crate::config::{TlsConfig, WebhookConfig};

/// Every leaf key of `t` (inline tables of a bucket count as one key), dotted.
fn leaves(t: &toml::Table, prefix: &str, sections: &[String], out: &mut Vec<String>) {
    for (k, v) in t {
        let path = join(prefix, k);
        match v {
            toml::Value::Table(inner) if sections.contains(&path) => {
                leaves(inner, &path, sections, out)
            }
            _ => out.push(path),
        }
    }
}

/// A configuration with every optional key set, so that serialising it names them.
fn everything_set() -> Config {
    let mut c = Config {
        advertise_host: Some("relay.example.org".into()),
        tls: TlsConfig {
            cert: Some(PathBuf::from("c.pem")),
            key: Some(PathBuf::from("k.pem")),
        },
        ..Config::default()
    };
    c.limits.registrations_per_address_per_minute = Some(5);
    c.objects.url = Some("s3://b".into());
    c.objects.endpoint = Some("https://s3.example.org".into());
    c.postgres.url = Some("host=/tmp".into());
    c.postgres.password_file = Some(PathBuf::from("p"));
    c.postgres.ca_file = Some(PathBuf::from("ca"));
    c.postgres.node_id = Some("n".into());
    c.verification.webhook = Some(WebhookConfig {
        url: "https://sms.example.org".into(),
        bearer_token_file: Some(PathBuf::from("t")),
        timeout: std::time::Duration::from_secs(1),
        allow_http: false,
    });
    c
}

#[test]
fn init_parses_to_the_defaults() {
    let text = init_toml();
    assert_eq!(
        Config::from_toml(&text).expect("init parses"),
        Config::default()
    );
    assert!(check(&text).is_empty(), "{:?}", check(&text));
}

#[test]
fn the_reference_names_every_key_of_the_types_with_its_default_and_meaning() {
    let names: Vec<String> = sections().into_iter().map(|s| s.name).collect();
    let keys = keys();
    let paths: Vec<String> = keys.iter().map(Key::path).collect();
    let mut all = Vec::new();
    let set = toml::Table::try_from(everything_set()).expect("serialises");
    leaves(&set, "", &names, &mut all);
    for path in &all {
        assert!(paths.contains(path), "{path} is missing from the reference");
    }
    assert_eq!(
        all.len(),
        paths.len(),
        "the reference has keys the types lack"
    );
    let defaults = toml::Table::try_from(Config::default()).expect("serialises");
    let text = init_toml();
    for key in &keys {
        assert!(!key.doc.is_empty(), "{} has no doc comment", key.path());
        let section = if key.section.is_empty() {
            Some(&defaults)
        } else {
            key.section
                .split('.')
                .try_fold(&defaults, |t, s| t.get(s)?.as_table())
        };
        let default = section.and_then(|t| t.get(&key.name));
        // A table absent by default takes its keys' defaults from serde's attributes.
        if !MACHINE_DEPENDENT.contains(&key.path().as_str())
            && key.section != "verification.webhook"
        {
            assert_eq!(key.default.as_ref(), default, "{}", key.path());
        }
        let line = |prefix: &str| format!("\n{prefix}{} = ", key.name);
        assert!(
            text.contains(&line("")) || text.contains(&line("# ")),
            "init does not mention {}",
            key.path()
        );
        assert!(text.contains(&format!(
            "# {}",
            key.doc.split_whitespace().next().unwrap_or_default()
        )));
    }
    let durability = keys.iter().find(|k| k.path() == "durability").expect("key");
    assert_eq!(
        durability
            .choices
            .iter()
            .map(|c| c.0.as_str())
            .collect::<Vec<_>>(),
        ["fsync", "os"]
    );
    assert!(
        durability.choices.iter().all(|c| !c.1.is_empty()),
        "choices carry their docs"
    );
}

#[test]
fn readme_table_is_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let table = markdown_table();
    let (Some(a), Some(b)) = (readme.find(TABLE_START), readme.find(TABLE_END)) else {
        panic!("README.md lacks the config-table markers");
    };
    let current = &readme[a + TABLE_START.len()..b];
    let wanted = format!("\n{table}");
    if current != wanted {
        if std::env::var_os("TERN_BLESS").is_some() {
            let fresh = format!("{}{}{wanted}{}", &readme[..a], TABLE_START, &readme[b..]);
            std::fs::write(&path, fresh).expect("write README.md");
            return;
        }
        panic!("README.md's configuration table is stale: run `TERN_BLESS=1 cargo test -p tern-relay --lib readme_table_is_current`");
    }
}

#[test]
fn check_names_every_problem_at_once() {
    let text = r#"
        listne = "127.0.0.1:1"
        durability = "sometimes"
        [limits]
        max_batch = "many"
        max_envelope_bytes = 5000000
        [expiry]
        message_ttl = "31days"
        [budget]
        min_free_disk_percent = 51
        [nonsense]
        a = 1
        [rate_limits]
        sends_per_account = "10/never"
        [tls]
        cert = "/nonexistent/cert.pem"
    "#;
    let problems = check(text);
    let joined = problems.join("\n");
    for expected in [
        "listne",
        "durability",
        "limits.max_batch",
        "limits.max_frame_bytes must exceed",
        "expiry.message_ttl",
        "budget.min_free_disk_percent",
        "[nonsense]",
        "rate_limits.sends_per_account",
        "connections.unauthenticated_frame_bytes",
        "tls.cert and tls.key go together",
        "tls.cert: cannot read",
    ] {
        assert!(
            joined.contains(expected),
            "{expected} missing from:\n{joined}"
        );
    }
    assert_eq!(problems.len(), 11, "{joined}");
    assert!(check("a = [")
        .first()
        .is_some_and(|p| p.contains("not valid TOML")));
}

#[test]
fn check_reads_keys_together_for_rules_between_them() {
    // A larger envelope is valid only with a larger frame: read alone, the envelope
    // key would fail against the default frame.
    let text = "[limits]\nmax_envelope_bytes = 5000000\nmax_frame_bytes = 8000000\n\
                [connections]\nunauthenticated_frame_bytes = 6000000\n";
    assert_eq!(check(text), Vec::<String>::new());
    let dev = check("[verification]\nverifier = \"dev-file\"\n");
    assert!(
        dev.iter().any(|p| p.contains("allow_dev_verifier")),
        "{dev:?}"
    );
}
