//! include/libchat.h must be what cbindgen makes of src/ffi today: regenerates it and fails on
//! any difference. `scripts/gen-header.sh` (CHAT_BLESS_HEADER=1) writes the new header instead.

use std::path::Path;

#[test]
fn the_committed_header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("reading cbindgen.toml");
    config.after_includes = Some(format!(
        "#define LIBCHAT_VERSION_MAJOR {}\n#define LIBCHAT_VERSION_MINOR {}\n#define LIBCHAT_VERSION_PATCH {}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH")
    ));
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen could not read src/ffi")
        .write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("the header is UTF-8");
    let path = root.join("include/libchat.h");
    if std::env::var_os("CHAT_BLESS_HEADER").is_some() {
        std::fs::write(&path, &fresh).expect("writing include/libchat.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/libchat.h differs from what cbindgen generates from src/ffi; run scripts/gen-header.sh and commit it"
    );
}
