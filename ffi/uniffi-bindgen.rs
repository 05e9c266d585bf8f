//! `uniffi-bindgen` for this workspace, so generating bindings needs no global
//! install. From the workspace root (docs/mobile.md):
//!
//! ```text
//! cargo build -p tern-ffi
//! cargo run -p tern-ffi --features cli --bin uniffi-bindgen -- generate \
//!     --library target/debug/libtern_ffi.so --language kotlin --out-dir bindings/kotlin
//! ```

fn main() {
    uniffi::uniffi_bindgen_main()
}
