//! Builds an example for a test: `cargo test --test X` alone builds none.
//! Included with `#[path = "support/example.rs"] mod example;`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// `target/<profile>/examples/<name>`, built once per test process.
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = profile_dir.join("examples").join(name);
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if !built.iter().any(|n| n == name) {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "--example", name, "--manifest-path"]);
        cargo.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        if profile_dir.ends_with("release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build");
        assert!(status.success(), "cargo build --example {name} failed");
        assert!(bin.exists(), "{} is missing", bin.display());
        built.push(name.to_string());
    }
    bin
}
