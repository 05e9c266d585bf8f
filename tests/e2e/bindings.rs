//! The generated bindings (tern-ffi through uniffi-bindgen): Python clients through
//! a real relay process, and the Kotlin and Swift sources the documented command
//! produces. The library is the cdylib cargo builds for this package's dependency
//! on tern-ffi; uniffi-bindgen is this package's `uniffi-bindgen-e2e` (the same
//! `uniffi_bindgen_main` as tern-ffi's `uniffi-bindgen`), so no nested cargo runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
    let mut child = Command::new(python)
        // No __pycache__ beside the script in the source tree.
        .arg("-B")
        .arg(script)
        .arg(&out)
        .arg(relay.address.to_string())
        .arg(&work)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("python output");
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
