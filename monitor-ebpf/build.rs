use which::which;

/// Rebuild the kernel programs when bpf-linker changes (aya-template does the same): cargo does
/// not track the linker on its own.
fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found in PATH: run `cargo xtask setup` to install it");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
