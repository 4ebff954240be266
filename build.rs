//! Link flags for the binaries, both for size (see Cargo.toml's profile).
//!
//! - `--icf=all` folds identical functions, the many copies of generic
//!   code. rust-lld (rustc's default linker on x86_64 Linux since 1.90) and
//!   gold know it; GNU ld does not, so `PEERIX_NO_ICF=1` leaves it out (the
//!   Nix package sets it: its linker is the toolchain's own).
//! - `-z pack-relative-relocs` packs the relative relocations of a PIE
//!   (RELR). It needs glibc 2.36 or newer at run time.
fn main() {
    println!("cargo:rerun-if-env-changed=PEERIX_NO_ICF");
    if std::env::var_os("PEERIX_NO_ICF").is_none_or(|v| v.is_empty() || v == "0") {
        println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
