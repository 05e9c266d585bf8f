//! The configuration reference, read from the configuration types themselves: every
//! key, its default (serialised from [`Config::default`]) and its meaning (the field's
//! doc comment, through `schemars`). `tern-relay init` ([`init_toml`]), `tern-relay
//! check-config` ([`check`]) and README.md's table ([`markdown_table`]) all come from
//! here, so none can drift from the code.

use serde_json::Value as Json;

use super::Config;

/// Keys whose default depends on the machine (half its cores): written commented out,
/// so that a file made on one machine does not pin another's.
const MACHINE_DEPENDENT: &[&str] = &["discovery.max_concurrent_evaluations"];

/// One configuration key.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// Its section: `""` for the top level, `"verification.webhook"` for a sub-table.
    pub section: String,
    /// Its name within the section.
    pub name: String,
    /// Its default; `None` for a key that is unset by default (or whose default
    /// depends on the machine).
    pub default: Option<toml::Value>,
    /// What it means: the field's doc comment, on one line.
    pub doc: String,
    /// The values an enumerated key takes, each with its meaning.
    pub choices: Vec<(String, String)>,
    /// The kind of value, for a key without a default (`"string"`, `"integer"`...).
    pub kind: String,
}

impl Key {
    /// `section.name`, or `name` at the top level.
    pub fn path(&self) -> String {
        join(&self.section, &self.name)
    }
}

/// A table of keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// `""` for the top level, else the table's dotted name.
    pub name: String,
    /// What it is for.
    pub doc: String,
    /// A table that is absent by default (`[verification.webhook]`).
    pub optional: bool,
    /// Its keys, in name order.
    pub keys: Vec<Key>,
}

fn join(section: &str, name: &str) -> String {
    if section.is_empty() {
        name.to_owned()
    } else {
        format!("{section}.{name}")
    }
}

/// Every section of the configuration, the top level first, each followed by its
/// sub-tables.
pub fn sections() -> Vec<Section> {
    let schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap_or(Json::Null);
    let defs = schema.get("$defs").cloned().unwrap_or(Json::Null);
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    let mut out = Vec::new();
    walk(&schema, &defs, Some(&defaults), "", "", false, &mut out);
    out
}

/// Every key, in the order of [`sections`].
pub fn keys() -> Vec<Key> {
    sections().into_iter().flat_map(|s| s.keys).collect()
}

/// The schema `s` refers to (through `$ref`, or the non-null arm of an `Option`), and
/// whether it may be null.
fn resolve<'a>(s: &'a Json, defs: &'a Json) -> (&'a Json, bool) {
    if let Some(arms) = s.get("anyOf").and_then(Json::as_array) {
        let null = |a: &Json| a.get("type").and_then(Json::as_str) == Some("null");
        if let (true, Some(inner)) = (arms.iter().any(null), arms.iter().find(|a| !null(a))) {
            return (resolve(inner, defs).0, true);
        }
    }
    if let Some(r) = s.get("$ref").and_then(Json::as_str) {
        let name = r.rsplit('/').next().unwrap_or_default();
        if let Some(target) = defs.get(name) {
            return (resolve(target, defs).0, false);
        }
    }
    let nullable = match s.get("type") {
        Some(Json::Array(types)) => types.iter().any(|t| t == "null"),
        _ => false,
    };
    (s, nullable)
}

/// A doc comment as one line: paragraphs joined, rustdoc link brackets dropped.
fn one_line(s: Option<&Json>) -> String {
    let text = s.and_then(Json::as_str).unwrap_or_default();
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("[`", "`")
        .replace("`]", "`")
}

fn description(prop: &Json, target: &Json) -> String {
    let own = one_line(prop.get("description"));
    if own.is_empty() {
        one_line(target.get("description"))
    } else {
        own
    }
}

/// The values of an enumeration, with their meanings.
fn choices(target: &Json) -> Vec<(String, String)> {
    if let Some(arms) = target.get("oneOf").and_then(Json::as_array) {
        return arms
            .iter()
            .filter_map(|a| {
                let value = a
                    .get("const")
                    .and_then(Json::as_str)
                    .or_else(|| a.get("enum")?.as_array()?.first()?.as_str())?;
                Some((value.to_owned(), one_line(a.get("description"))))
            })
            .collect();
    }
    target
        .get("enum")
        .and_then(Json::as_array)
        .map(|values| {
            values
                .iter()
                .filter_map(Json::as_str)
                .map(|v| (v.to_owned(), String::new()))
                .collect()
        })
        .unwrap_or_default()
}

fn kind(target: &Json) -> String {
    match target.get("type") {
        Some(Json::String(t)) => t.clone(),
        Some(Json::Array(types)) => types
            .iter()
            .filter_map(Json::as_str)
            .find(|t| *t != "null")
            .unwrap_or("value")
            .to_owned(),
        _ if target.get("properties").is_some() => "table".into(),
        _ => "value".into(),
    }
}

/// A JSON default (from a `#[serde(default = "...")]` in the schema) as TOML.
fn json_to_toml(j: &Json) -> Option<toml::Value> {
    Some(match j {
        Json::Bool(b) => toml::Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Json::String(s) => toml::Value::String(s.clone()),
        _ => return None,
    })
}

/// Adds the section of struct schema `obj` (named `name`), then its sub-tables.
/// Structs are sections at the top level and where they are absent by default;
/// elsewhere (a bucket's `{ burst, refill }`) they are one key with an inline value.
fn walk(
    obj: &Json,
    defs: &Json,
    defaults: Option<&toml::Table>,
    name: &str,
    doc: &str,
    optional: bool,
    out: &mut Vec<Section>,
) {
    let mut keys = Vec::new();
    let mut subs = Vec::new();
    let empty = serde_json::Map::new();
    let props = obj
        .get("properties")
        .and_then(Json::as_object)
        .unwrap_or(&empty);
    for (field, prop) in props {
        let (target, _) = resolve(prop, defs);
        let path = join(name, field);
        let mut default = defaults
            .and_then(|t| t.get(field))
            .cloned()
            .or_else(|| prop.get("default").and_then(json_to_toml));
        let is_struct = target.get("properties").is_some();
        if is_struct && (name.is_empty() || default.is_none()) {
            subs.push((target, default, path, description(prop, target)));
            continue;
        }
        if MACHINE_DEPENDENT.contains(&path.as_str()) {
            default = None;
        }
        keys.push(Key {
            section: name.to_owned(),
            name: field.clone(),
            default,
            doc: description(prop, target),
            choices: choices(target),
            kind: kind(target),
        });
    }
    out.push(Section {
        name: name.to_owned(),
        doc: doc.to_owned(),
        optional,
        keys,
    });
    for (target, default, path, doc) in subs {
        let table = match &default {
            Some(toml::Value::Table(t)) => Some(t),
            _ => None,
        };
        walk(
            target,
            defs,
            table,
            &path,
            &doc,
            optional || table.is_none(),
            out,
        );
    }
}

/// `text` as `# ` comment lines of at most about 88 columns.
fn comment(out: &mut String, prefix: &str, text: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && prefix.len() + line.len() + word.len() + 1 > 88 {
            out.push_str(&format!("{prefix}{line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!("{prefix}{line}\n"));
    }
}

/// A value as TOML writes it inline.
fn inline(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(t) => {
            let parts: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{k} = {}", inline(v)))
                .collect();
            format!("{{ {} }}", parts.join(", "))
        }
        v => v.to_string(),
    }
}

fn choices_text(key: &Key) -> String {
    let text: Vec<String> = key
        .choices
        .iter()
        .map(|(v, d)| {
            let d = d.trim_end_matches('.');
            if d.is_empty() {
                format!("\"{v}\"")
            } else {
                format!("\"{v}\" ({d})")
            }
        })
        .collect();
    format!("One of {}.", text.join(", "))
}

/// The commented configuration `tern-relay init` writes: every key with its meaning
/// and its default. It parses to [`Config::default`]; keys without a default, and
/// tables absent by default, are commented out.
pub fn init_toml() -> String {
    let mut out = String::new();
    comment(
        &mut out,
        "# ",
        &format!(
            "Tern relay configuration, written by `tern-relay init` (version {}). Every \
             key is optional: each is shown with its default, and a key left out keeps \
             it. Keys without a default are commented out. Check a file with \
             `tern-relay check-config FILE`.",
            env!("CARGO_PKG_VERSION")
        ),
    );
    for section in sections() {
        let c = if section.optional { "# " } else { "" };
        out.push('\n');
        if !section.name.is_empty() {
            comment(&mut out, "# ", &section.doc);
            out.push_str(&format!("{c}[{}]\n", section.name));
        }
        for key in &section.keys {
            comment(&mut out, "# ", &key.doc);
            if !key.choices.is_empty() {
                comment(&mut out, "#   ", &choices_text(key));
            }
            match &key.default {
                Some(v) => out.push_str(&format!("{c}{} = {}\n", key.name, inline(v))),
                None => out.push_str(&format!("# {} = <{}>\n", key.name, key.kind)),
            }
        }
    }
    out
}

/// The Markdown table of every key (README.md's, between the markers
/// [`TABLE_START`] and [`TABLE_END`]).
pub fn markdown_table() -> String {
    let mut out = String::from("| key | default | meaning |\n|---|---|---|\n");
    for key in keys() {
        let default = match &key.default {
            Some(v) => format!("`{}`", inline(v)),
            None if MACHINE_DEPENDENT.contains(&key.path().as_str()) => "(machine)".into(),
            None => "(unset)".into(),
        };
        let mut doc = key.doc.clone();
        if !key.choices.is_empty() {
            doc.push(' ');
            doc.push_str(&choices_text(&key));
        }
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            key.path(),
            default.replace('|', "\\|"),
            doc.replace('|', "\\|")
        ));
    }
    out
}

/// Where README.md's generated table starts.
pub const TABLE_START: &str =
    "<!-- config-table: generated by `tern-relay init --markdown`; a test keeps it current -->";
/// Where it ends.
pub const TABLE_END: &str = "<!-- config-table end -->";

/// Every problem in a configuration file at once: TOML syntax (which stops the rest),
/// each unknown key, wrong type or bad value (each key is read on its own over the
/// defaults), then the checks of the values against each other and the start-time
/// rules (files named, the development verifier's allowance). Empty if the file is
/// good.
pub fn check(text: &str) -> Vec<String> {
    let table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => return vec![format!("not valid TOML: {}", e.message())],
    };
    let sections: Vec<String> = sections().into_iter().map(|s| s.name).collect();
    let mut problems = Vec::new();
    // The file without its bad keys, to check the rest together.
    let mut good = toml::Table::new();
    for (name, value) in &table {
        match value {
            toml::Value::Table(inner) if sections.contains(name) => {
                for (key, v) in inner {
                    let one = one_key(&[name, key], v.clone());
                    match key_problem(&one) {
                        Some(p) => problems.push(format!("{name}.{key}: {p}")),
                        None => merge(&mut good, one),
                    }
                }
            }
            _ => {
                let one = one_key(&[name], value.clone());
                match key_problem(&one) {
                    Some(p)
                        if sections.contains(name) || !matches!(value, toml::Value::Table(_)) =>
                    {
                        problems.push(format!("{name}: {p}"))
                    }
                    Some(_) => problems.push(format!("[{name}]: unknown section")),
                    None => merge(&mut good, one),
                }
            }
        }
    }
    let Ok(config) = Config::parse(&good.to_string()) else {
        return problems;
    };
    problems.extend(config.problems());
    problems.extend(start_problems(&config));
    problems
}

/// `value` at the dotted place `path`.
fn one_key(path: &[&String], value: toml::Value) -> toml::Table {
    let mut v = value;
    for part in path.iter().skip(1).rev() {
        let mut t = toml::Table::new();
        t.insert((*part).clone(), v);
        v = toml::Value::Table(t);
    }
    let mut top = toml::Table::new();
    if let Some(first) = path.first() {
        top.insert((*first).clone(), v);
    }
    top
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Why one key on its own over the defaults does not parse, if it does not.
fn key_problem(one: &toml::Table) -> Option<String> {
    match Config::parse(&one.to_string()) {
        Ok(_) => None,
        Err(crate::error::Error::Config(m)) => Some(first_line(&m)),
        Err(e) => Some(e.to_string()),
    }
}

/// The message of a TOML error without its source excerpt (which would show the
/// one-key document, not the file).
fn first_line(m: &str) -> String {
    m.lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.contains('|') && !l.starts_with("TOML parse error"))
        .unwrap_or(m)
        .trim()
        .to_owned()
}

/// What the relay refuses at start beyond the file's own values: files it names that
/// cannot be read, and the development verifier without its allowance.
fn start_problems(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let files = [
        ("tls.cert", config.tls.cert.as_ref()),
        ("tls.key", config.tls.key.as_ref()),
        (
            "postgres.password_file",
            config.postgres.password_file.as_ref(),
        ),
        ("postgres.ca_file", config.postgres.ca_file.as_ref()),
        (
            "verification.webhook.bearer_token_file",
            config
                .verification
                .webhook
                .as_ref()
                .and_then(|w| w.bearer_token_file.as_ref()),
        ),
    ];
    for (key, path) in files {
        if let Some(path) = path {
            if let Err(e) = std::fs::File::open(path) {
                out.push(format!("{key}: cannot read {}: {e}", path.display()));
            }
        }
    }
    if config.verification.verifier == super::VerifierKind::DevFile
        && !config.verification.allow_dev_verifier
    {
        out.push(
            "verification.verifier = \"dev-file\" needs verification.allow_dev_verifier = true \
             (or serve --allow-dev-verifier): it is refused at start"
                .into(),
        );
    }
    out
}

#[cfg(test)]
mod tests;
