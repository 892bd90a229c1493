//! Paths and images: where the binary, the guest images and the logs are, and building them.

use super::*;

/// The crate root (tests run with it as working directory).
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The minivmm binary under test: `$MINIVMM_TEST_BIN` or the one cargo built for this test run.
pub fn minivmm_bin() -> PathBuf {
    match std::env::var_os(BIN_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_minivmm")),
    }
}

/// The guest command line for this test host.
///
/// Inside the emulated test host the guest gets `noxsave`: QEMU's TCG SVM does not deliver the
/// XSETBV intercept, so L1 KVM never learns the guest's XCR0 and reloads a stale one (x87 only)
/// on every VM entry. A guest using XSAVE then warns "XSAVE consistency problem" at boot, and this
/// is the likely cause of the two guest triple faults seen in about 150 emulated boots. With
/// FXSAVE the guest does not depend on XCR0. On hardware KVM the guest keeps XSAVE.
pub fn guest_cmdline() -> String {
    if is_inner_run() {
        format!("{GUEST_CMDLINE} noxsave")
    } else {
        GUEST_CMDLINE.to_string()
    }
}

/// True inside the emulated test host (the host root is a read-only share there).
pub fn is_inner_run() -> bool {
    std::env::var_os(INNER_ENV).is_some_and(|v| v == "1")
}

/// Where logs go: `target/test-logs` (or a tmpfs directory inside the emulated host).
pub fn log_dir() -> PathBuf {
    let dir = if is_inner_run() {
        std::env::temp_dir().join("minivmm-test-logs")
    } else {
        // CARGO_TARGET_TMPDIR is <target>/tmp.
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        tmp.parent()
            .map_or(tmp.clone(), Path::to_path_buf)
            .join("test-logs")
    };
    if let Err(e) = fs::create_dir_all(&dir) {
        panic!("cannot create the log directory {}: {e}", dir.display());
    }
    dir
}

/// The guest images built by `tests/guest/build-images.sh`.
#[derive(Debug, Clone)]
pub struct Images {
    /// Debian bzImage (L1 and L2 kernel).
    pub bzimage: PathBuf,
    /// The same kernel as an ELF vmlinux with the PVH note.
    pub vmlinux: PathBuf,
    /// Kernel release string, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// Busybox guest initramfs.
    pub l2_initramfs: PathBuf,
    /// Emulated test host initramfs.
    pub l1_initramfs: PathBuf,
}

/// Returns the guest images, building them first (once per process) unless inside the emulated host.
pub fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let cache = repo_dir().join("tests/.cache");
        if !is_inner_run() {
            let script = repo_dir().join("tests/guest/build-images.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            if !out.status.success() {
                panic!(
                    "{} failed ({}):\n{}{}",
                    script.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let imgs = Images {
            bzimage: cache.join("kernel/vmlinuz"),
            vmlinux: cache.join("kernel/vmlinux"),
            release: fs::read_to_string(cache.join("kernel/release"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            l2_initramfs: cache.join("l2-initramfs.gz"),
            l1_initramfs: cache.join("l1-initramfs.gz"),
        };
        for p in [
            &imgs.bzimage,
            &imgs.vmlinux,
            &imgs.l2_initramfs,
            &imgs.l1_initramfs,
        ] {
            assert!(
                p.is_file(),
                "missing guest image {} (run tests/guest/build-images.sh)",
                p.display()
            );
        }
        imgs
    })
}
