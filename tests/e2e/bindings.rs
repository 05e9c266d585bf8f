//! The generated bindings (tern-ffi through uniffi-bindgen): Python clients, and
//! Kotlin clients compiled with kotlinc and run on the JVM, through a real relay
//! process; and the Swift sources the documented command produces. The library is
//! the cdylib cargo builds for this package's dependency on tern-ffi; uniffi-bindgen
//! is this package's `uniffi-bindgen-e2e` (the same `uniffi_bindgen_main` as
//! tern-ffi's `uniffi-bindgen`), so no nested cargo runs.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::RelayProcess;

/// The one command docs/mobile.md and the README give (building the library, then
/// generating from it), up to uniffi-bindgen's arguments.
const DOC_PREFIX: &str = "cargo build -p tern-ffi --features cli && \
    cargo run -p tern-ffi --features cli --bin uniffi-bindgen -- ";

/// tern-ffi's cdylib, built beside this test binary (`target/<profile>/deps`).
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    let name = format!(
        "{}tern_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [deps.join(&name), deps.join("..").join(&name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found beside {}", deps.display()))
}

/// The documented command's arguments, with the library and output directory
/// replaced by this build's and `out`.
fn documented_args(library: &Path, out: &Path) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/mobile.md"))
        .expect("docs/mobile.md");
    let line = doc
        .lines()
        .find_map(|l| l.trim().strip_prefix(DOC_PREFIX))
        .expect("docs/mobile.md gives the uniffi-bindgen command");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    assert!(
        readme.contains(&format!("{DOC_PREFIX}{line}")),
        "the README gives the same command as docs/mobile.md"
    );
    let mut args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    for (flag, value) in [("--library", library), ("--out-dir", out)] {
        let at = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the documented command has {flag}"));
        args[at + 1] = value.display().to_string();
    }
    args
}

/// Runs the documented generation into `out`.
fn generate(out: &Path) {
    let library = cdylib();
    let status = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen-e2e"))
        .args(documented_args(&library, out))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("running uniffi-bindgen");
    assert!(status.success(), "uniffi-bindgen failed: {status}");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `command` to its end or for `limit` at most (then it and its children are
/// killed), its output in files beside `log` (a pipe could fill and stall it).
fn run_bounded(command: &mut Command, limit: Duration, log: &Path) -> Output {
    let (out_path, err_path) = (log.with_extension("out"), log.with_extension("err"));
    let file =
        |p: &Path| std::fs::File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file(&out_path))
        .stderr(file(&err_path))
        // Its own process group, so a timeout ends what it started too (kotlinc is a
        // shell script that starts java).
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            // kill(2) on the child's own group (never `kill -KILL -<pid>`: Debian 12's
            // procps reads that as a signal number and can hit `kill(-1)`).
            let group = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read_bytes = |p: &Path| std::fs::read(p).unwrap_or_default();
    Output {
        status,
        stdout: read_bytes(&out_path),
        stderr: read_bytes(&err_path),
    }
}

/// Python 3 (`$TERN_PYTHON`, else `python3` on PATH); only the standard library.
fn python() -> String {
    let python = std::env::var("TERN_PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python).arg("--version").output() {
        Ok(o) if o.status.success() => python,
        _ => panic!(
            "the bindings test needs Python 3 ({python} not found): install Debian's \
             python3 or set TERN_PYTHON"
        ),
    }
}

#[test]
fn python_clients_exchange_messages_and_an_attachment_through_a_relay_process() {
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bindings");
    generate(&out);
    // The generated module loads the library from its own directory.
    let library = cdylib();
    std::fs::copy(&library, out.join(library.file_name().expect("name"))).expect("copy cdylib");
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/bindings/two_clients.py");
    let output = run_bounded(
        Command::new(python)
            // No __pycache__ beside the script in the source tree.
            .arg("-B")
            .arg(script)
            .arg(&out)
            .arg(relay.address.to_string())
            .arg(&work),
        Duration::from_secs(120),
        &dir.path().join("python"),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success() && stdout.trim_end().ends_with("ok"),
        "the Python clients failed ({}):\n{stdout}\n{stderr}\nrelay log:\n{}",
        output.status,
        relay.log_text()
    );
}

#[test]
fn the_documented_command_generates_kotlin_and_swift_sources() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bindings");
    generate(&out);
    let kotlin = read(&out.join("uniffi/tern/tern.kt"));
    for api in [
        "package uniffi.tern",
        "suspend fun `register`(`relay`: kotlin.String",
        "suspend fun `open`(`dir`: kotlin.String",
        "class TernClient",
        "suspend fun `sendWithAttachments`(",
        "suspend fun `nextEvent`()",
        "interface TransferProgress",
        "sealed class TernException",
        "class WrongStorageKey",
        // ffi/bindgen.toml: `message` would clash with Throwable.message
        "val `relayMessage`: kotlin.String",
    ] {
        assert!(kotlin.contains(api), "the Kotlin source lacks {api:?}");
    }
    let swift = read(&out.join("tern.swift"));
    for api in [
        // (uniffi's Swift template writes no space before `async`)
        "public func register(relay: String, dir: String, storageKey: Data)async throws",
        "open class TernClient",
        "open func sendWithAttachments(to: Data, body: Data, attachments: [Attachment])",
        "open func nextEvent()async  -> TernEvent?",
        "public protocol TransferProgress",
        "enum TernError: Swift.Error",
        "case WrongStorageKey",
    ] {
        assert!(swift.contains(api), "the Swift source lacks {api:?}");
    }
    let header = read(&out.join("ternFFI.h"));
    assert!(
        header.contains("uniffi_tern_ffi_fn_func_register"),
        "the C header names the functions"
    );
    assert!(
        out.join("ternFFI.modulemap").exists(),
        "the Swift module map"
    );
    assert!(out.join("tern.py").exists(), "the Python module too");
}

/// Where `.ci/setup` installs the Kotlin compiler (npm's `kotlin-compiler`).
fn kotlinc_cache() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/tern-kotlin/node_modules/kotlin-compiler/bin/kotlinc"))
}

/// A Kotlin compiler (`$TERN_KOTLINC`, else `kotlinc` on PATH, else where `.ci/setup`
/// puts it), JNA, kotlinx-coroutines and atomicfu (Debian's jars) and `java`.
struct Kotlin {
    kotlinc: PathBuf,
    jars: Vec<PathBuf>,
}

fn kotlin() -> Kotlin {
    let runs = |program: &Path, arg: &str| {
        Command::new(program)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        runs(Path::new("java"), "-version"),
        "the Kotlin bindings test needs Java 11 or later: install Debian's \
         openjdk-17-jdk-headless (.ci/setup does)"
    );
    let kotlinc = [
        std::env::var_os("TERN_KOTLINC").map(PathBuf::from),
        Some(PathBuf::from("kotlinc")),
        kotlinc_cache(),
    ]
    .into_iter()
    .flatten()
    .find(|k| runs(k, "-version"))
    .unwrap_or_else(|| {
        panic!(
            "the Kotlin bindings test needs a Kotlin compiler (1.9 or later): run .ci/setup \
             (npm install --prefix ~/.cache/tern-kotlin kotlin-compiler@2.4.20), or set \
             TERN_KOTLINC"
        )
    });
    // (coroutines 1.0.1 needs atomicfu at run time)
    let jars: Vec<PathBuf> = ["jna.jar", "kotlinx-coroutines-core.jar", "atomicfu.jar"]
        .iter()
        .map(|jar| Path::new("/usr/share/java").join(jar))
        .collect();
    for jar in &jars {
        assert!(
            jar.exists(),
            "the Kotlin bindings test needs {}: install Debian's libjna-java, \
             libkotlinx-coroutines-java and libkotlinx-atomicfu-java (.ci/setup does)",
            jar.display()
        );
    }
    Kotlin { kotlinc, jars }
}

fn classpath(entries: &[PathBuf]) -> String {
    let paths: Vec<String> = entries.iter().map(|p| p.display().to_string()).collect();
    paths.join(":")
}

#[test]
fn the_generated_kotlin_compiles_and_two_kotlin_clients_talk_through_a_relay_process() {
    let kotlin = kotlin();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("bindings");
    generate(&out);
    // One compile (kotlinc takes about a minute): the generated source, the program and
    // the coroutines marker Debian's 1.0.1 lacks, with the Kotlin runtime in the jar.
    let sources = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/bindings");
    let app = dir.path().join("two_clients.jar");
    let compiled = run_bounded(
        Command::new(&kotlin.kotlinc)
            .arg(out.join("uniffi/tern/tern.kt"))
            .arg(Path::new(sources).join("TwoClients.kt"))
            .arg(Path::new(sources).join("DelicateCoroutinesApi.kt"))
            .arg("-nowarn")
            .args(["-cp", &classpath(&kotlin.jars)])
            .arg("-include-runtime")
            .arg("-d")
            .arg(&app),
        Duration::from_secs(300),
        &dir.path().join("kotlinc"),
    );
    assert!(
        compiled.status.success(),
        "kotlinc failed ({}):\n{}{}",
        compiled.status,
        String::from_utf8_lossy(&compiled.stdout),
        String::from_utf8_lossy(&compiled.stderr)
    );

    let library = cdylib();
    let relay = RelayProcess::start(&dir.path().join("relay"), &[]).expect("relay");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let mut classes = vec![app];
    classes.extend(kotlin.jars);
    let output = run_bounded(
        Command::new("java")
            .arg(format!(
                "-Djna.library.path={}",
                library.parent().expect("library dir").display()
            ))
            .args(["-cp", &classpath(&classes), "TwoClientsKt"])
            .arg(relay.address.to_string())
            .arg(&work),
        Duration::from_secs(120),
        &dir.path().join("java"),
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success() && stdout.trim_end().ends_with("ok"),
        "the Kotlin clients failed ({}):\n{stdout}\n{stderr}\nrelay log:\n{}",
        output.status,
        relay.log_text()
    );
}
