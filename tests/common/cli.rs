//! Running minivmm without a guest (argument errors).

use super::*;

/// Output of a minivmm run that was expected to end on its own.
#[derive(Debug)]
pub struct Finished {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

/// Runs minivmm with `args` and no stdin; kills it after `timeout` (and fails).
pub fn run_minivmm(args: &[&str], timeout: Duration) -> Finished {
    let bin = minivmm_bin();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let start = Instant::now();
    let (out, err) = (
        Arc::new(Collected::default()),
        Arc::new(Collected::default()),
    );
    let readers = [
        spawn_reader(
            child.stdout.take().expect("piped stdout"),
            out.clone(),
            None,
            start,
        ),
        spawn_reader(
            child.stderr.take().expect("piped stderr"),
            err.clone(),
            None,
            start,
        ),
    ];
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "minivmm {args:?} did not exit within {:.0}s",
                timeout.as_secs_f64()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    for r in readers {
        let _ = r.join();
    }
    Finished {
        code: status.code(),
        stdout: out.text(),
        stderr: err.text(),
    }
}
