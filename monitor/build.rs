//! Builds the kernel programs (`monitor-ebpf`) with the nightly toolchain and bpf-linker, so that
//! `cargo build -p monitor` yields one self-contained `twmon` binary that embeds them.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitor-ebpf");
    let root = root.to_str().context("non-UTF-8 path to monitor-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "monitor-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the kernel programs failed; `cargo xtask setup` installs what they need")
}
