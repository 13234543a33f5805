//! Gives libchat.so the SONAME libchat.so.<major>, so programs linked against one major version
//! never load an incompatible one.

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libchat.so.{major}");
    println!("cargo:rerun-if-changed=build.rs");
}
