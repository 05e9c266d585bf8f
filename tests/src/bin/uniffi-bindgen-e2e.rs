//! `uniffi-bindgen` built inside this package, so the bindings tests get it through
//! `CARGO_BIN_EXE_uniffi-bindgen-e2e` with no nested cargo call: the same
//! `uniffi_bindgen_main` as tern-ffi's `uniffi-bindgen` (feature `cli`).

fn main() {
    uniffi::uniffi_bindgen_main()
}
