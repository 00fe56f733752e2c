//! Builds the kernel programs (`ztrust-ebpf`) for the BPF target and leaves the object in `OUT_DIR`,
//! where `src/datapath` embeds it.
//!
//! The BPF target needs `core` built from source (`-Z build-std=core`). The toolchain that has those
//! sources is linked into rustup as `ztrust-bpf` by `cargo xtask setup`; `ZTRUST_BPF_TOOLCHAIN`
//! overrides the name (e.g. `nightly` where rustup has `rust-src`).
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=ZTRUST_BPF_TOOLCHAIN");
    let toolchain = std::env::var("ZTRUST_BPF_TOOLCHAIN").unwrap_or_else(|_| "ztrust-bpf".to_owned());
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("workspace root")?
        .join("ztrust-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    println!("cargo:rerun-if-changed={ebpf_dir}/src");
    println!("cargo:rerun-if-changed={ebpf_dir}/../ztrust-common/src");
    // A toolchain without the `nightly` channel only builds `core` when told it may use unstable
    // flags; aya-build reads RUSTC_BOOTSTRAP from this process and passes it on to the eBPF build.
    if toolchain != "nightly" {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let package = aya_build::Package {
        name: "ztrust-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain)).with_context(|| {
        format!("building the eBPF programs with toolchain `{toolchain}` (run `cargo xtask setup`)")
    })?;
    compile_protos(&manifest_dir)
}

/// The flow API (`proto/observer.proto`) → Rust, with the pure-Rust `protox` compiler: no system
/// `protoc` needed. The well-known types (`google/protobuf/timestamp.proto`) are built into protox.
fn compile_protos(manifest_dir: &std::path::Path) -> anyhow::Result<()> {
    let proto_dir = manifest_dir.join("proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let fds = protox::compile(["observer.proto"], [&proto_dir]).context("compiling proto/observer.proto")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .context("generating the gRPC code of proto/observer.proto")
}
