//! What xtask's tasks and its tests share: the workspace's paths, and the checks of what ships
//! beside the binary (run by `xtask/tests/checks.rs`).
use std::path::PathBuf;

pub mod checks;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions. Avoids a libc dependency for one call.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}
