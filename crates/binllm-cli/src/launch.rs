//! `binllm convert --gpus N`: one process per GPU. This process is rank 0 (GPU 0); it
//! creates the NCCL unique id and starts ranks 1..N as children of the same binary with
//! the same arguments, each told its place through the environment
//! (`binllm_train::parallel::RankEnv`) and shown one GPU through `CUDA_VISIBLE_DEVICES`.
//! A child that fails ends the whole run with its rank named; rank 0 failing stops the
//! children.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use binllm_train::parallel::{nccl, NCCL_ID_VAR, RANK_VAR, WORLD_SIZE_VAR};

/// NVLink SHARP (NVLS) multicast stays off: it needs fabric-manager multicast support the
/// lent machines lack, and data parallelism does not need it.
const NVLS_VAR: &str = "NCCL_NVLS_ENABLE";

/// Turns NVLS off for this process (rank 0). Call first thing, before any thread starts:
/// changing the environment while other threads read it is a race.
pub fn disable_nvls() {
    std::env::set_var(NVLS_VAR, "0");
}

/// Checks `--gpus` against `--device` (before anything asks libtorch about CUDA).
pub fn check_gpus(gpus: usize, device: Option<&str>) -> Result<()> {
    ensure!(gpus >= 1, "--gpus must be at least 1");
    ensure!(
        gpus == 1 || device == Some("cuda"),
        "--gpus {gpus} needs --device cuda (each rank takes one GPU, rank r the r-th visible one), not --device {}",
        device.unwrap_or("auto (the default)")
    );
    Ok(())
}

/// Checks `--gpus` against the GPUs libtorch sees.
pub fn check_visible_gpus(gpus: usize, visible: usize) -> Result<()> {
    ensure!(
        gpus == 1 || visible >= gpus,
        "--gpus {gpus}: only {visible} CUDA device{} visible",
        if visible == 1 { " is" } else { "s are" }
    );
    Ok(())
}

/// The physical id of each visible GPU, in order: `CUDA_VISIBLE_DEVICES` when set, else
/// 0..count.
pub fn visible_gpu_ids(cuda_visible_devices: Option<&str>, count: usize) -> Vec<String> {
    match cuda_visible_devices.filter(|v| !v.trim().is_empty()) {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().to_string())
            .take(count)
            .collect(),
        None => (0..count).map(|i| i.to_string()).collect(),
    }
}

/// The child processes of ranks 1..N, watched in the background.
pub struct Ranks {
    children: Arc<Mutex<Vec<(usize, Child)>>>,
    watcher: Option<std::thread::JoinHandle<Option<String>>>,
}

/// What happens when a child fails while rank 0 runs: rank 0 would wait forever in NCCL for
/// a rank that died, so the whole run ends at once.
fn end_the_run(message: &str) {
    eprintln!("error: binllm convert --gpus: {message}; the other ranks were stopped");
    std::process::exit(1);
}

impl Ranks {
    /// Starts ranks 1..`gpus` with this process's binary and arguments, each with
    /// `NCCL_NVLS_ENABLE=0`; a child that fails ends this process too.
    pub fn spawn(gpus: usize, id: &nccl::UniqueId, gpu_ids: &[String]) -> Result<Ranks> {
        let exe =
            std::env::current_exe().context("cannot find this binary to start the other ranks")?;
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        Ranks::start(&exe, &args, gpus, id, gpu_ids, end_the_run)
    }

    /// Starts ranks 1..`gpus` as `exe args`, with the rank environment; the watcher kills
    /// the others and calls `on_failure` when one fails.
    fn start(
        exe: &Path,
        args: &[OsString],
        gpus: usize,
        id: &nccl::UniqueId,
        gpu_ids: &[String],
        on_failure: fn(&str),
    ) -> Result<Ranks> {
        ensure!(
            gpu_ids.len() >= gpus,
            "--gpus {gpus}: only {} GPU ids known",
            gpu_ids.len()
        );
        let mut children = Vec::new();
        for (rank, gpu) in gpu_ids.iter().enumerate().take(gpus).skip(1) {
            let mut command = Command::new(exe);
            // A child whose rank 0 is gone (killed, crashed) would wait in NCCL forever:
            // the kernel kills it when this process dies.
            // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = command
                .args(args)
                .env(RANK_VAR, rank.to_string())
                .env(WORLD_SIZE_VAR, gpus.to_string())
                .env(NCCL_ID_VAR, id.to_hex())
                .env("CUDA_VISIBLE_DEVICES", gpu)
                .env(NVLS_VAR, "0")
                .spawn()
                .with_context(|| format!("cannot start rank {rank} ({})", exe.display()));
            match child {
                Ok(c) => children.push((rank, c)),
                Err(e) => {
                    kill_all(&mut children);
                    return Err(e);
                }
            }
        }
        let children = Arc::new(Mutex::new(children));
        let watched = children.clone();
        let watcher = std::thread::spawn(move || loop {
            let mut guard = watched.lock().unwrap_or_else(|e| e.into_inner());
            let mut failed = None;
            guard.retain_mut(|(rank, child)| match child.try_wait() {
                Ok(Some(status)) if status.success() => false,
                Ok(Some(status)) => {
                    failed = Some(format!("rank {rank} (pid {}) failed: {status}", child.id()));
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    failed = Some(format!("rank {rank}: cannot wait for it: {e}"));
                    false
                }
            });
            if let Some(message) = failed {
                kill_all(&mut guard);
                on_failure(&message);
                return Some(message);
            }
            if guard.is_empty() {
                return None;
            }
            drop(guard);
            std::thread::sleep(Duration::from_millis(100));
        });
        Ok(Ranks {
            children,
            watcher: Some(watcher),
        })
    }

    /// Waits for every child to finish; the first failure, with its rank named.
    pub fn wait(mut self) -> Result<()> {
        if let Some(w) = self.watcher.take() {
            match w.join() {
                Ok(None) => {}
                Ok(Some(message)) => bail!("{message}; the other ranks were stopped"),
                Err(_) => bail!("the rank watcher panicked"),
            }
        }
        Ok(())
    }

    /// Stops every child (rank 0 failed).
    pub fn stop(self) {
        kill_all(&mut self.children.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

fn kill_all(children: &mut Vec<(usize, Child)>) {
    for (_, child) in children.iter_mut() {
        child.kill().ok();
        child.wait().ok();
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_checked_against_the_device_and_the_visible_gpus() {
        assert!(check_gpus(1, None).is_ok());
        assert!(check_gpus(1, Some("cpu")).is_ok());
        assert!(check_gpus(2, Some("cuda")).is_ok());
        let err = |g, d| check_gpus(g, d).unwrap_err().to_string();
        assert!(err(0, Some("cuda")).contains("at least 1"));
        assert!(err(2, Some("cpu")).contains("--device cuda"));
        assert!(err(2, None).contains("--device cuda"));
        assert!(err(2, Some("cuda:1")).contains("--device cuda"));
        let visible = |g, v| check_visible_gpus(g, v).unwrap_err().to_string();
        assert!(visible(4, 2).contains("only 2 CUDA devices"));
        assert!(visible(2, 1).contains("only 1 CUDA device is"));
        assert!(check_visible_gpus(2, 2).is_ok());
        assert!(check_visible_gpus(1, 0).is_ok());
    }

    fn shell(script: &str, gpus: usize) -> Result<Ranks> {
        let id = nccl::UniqueId([0xab; nccl::UNIQUE_ID_BYTES]);
        let gpu_ids: Vec<String> = (0..gpus).map(|i| format!("gpu{i}")).collect();
        let args = [OsString::from("-c"), OsString::from(script)];
        Ranks::start(Path::new("/bin/sh"), &args, gpus, &id, &gpu_ids, |_| {})
    }

    #[test]
    fn children_get_their_rank_environment() {
        // Each child checks its own environment and exits 0 only when it is right.
        let script = r#"
            case "$BINLLM_RANK" in 1|2) ;; *) exit 10 ;; esac
            [ "$BINLLM_WORLD_SIZE" = 3 ] || exit 11
            [ "$CUDA_VISIBLE_DEVICES" = "gpu$BINLLM_RANK" ] || exit 12
            [ "$NCCL_NVLS_ENABLE" = 0 ] || exit 13
            [ "$BINLLM_NCCL_ID" = "$(printf 'ab%.0s' $(seq 128))" ] || exit 14
        "#;
        shell(script, 3).unwrap().wait().unwrap();
        let err = shell("exit 12", 2).unwrap().wait().unwrap_err().to_string();
        assert!(err.contains("rank 1") && err.contains("12"), "{err}");
    }

    #[test]
    fn a_failed_child_stops_the_others_and_is_named() {
        // Rank 2 fails at once; ranks 1 and 3 would sleep for an hour unless stopped.
        let script = r#"[ "$BINLLM_RANK" = 2 ] && exit 3; exec sleep 3600"#;
        let err = shell(script, 4).unwrap().wait().unwrap_err().to_string();
        assert!(err.contains("rank 2") && err.contains("3"), "{err}");
        // stop() ends children that are still running.
        shell("exec sleep 3600", 3).unwrap().stop();
        // Fewer GPU ids than ranks is refused before anything starts.
        let id = nccl::UniqueId([0; nccl::UNIQUE_ID_BYTES]);
        let one_id = ["gpu0".to_string()];
        assert!(Ranks::start(Path::new("/bin/true"), &[], 2, &id, &one_id, |_| {}).is_err());
    }

    #[test]
    fn gpu_ids_follow_cuda_visible_devices() {
        assert_eq!(visible_gpu_ids(None, 3), vec!["0", "1", "2"]);
        assert_eq!(visible_gpu_ids(Some(""), 2), vec!["0", "1"]);
        assert_eq!(visible_gpu_ids(Some("4, 6,7"), 3), vec!["4", "6", "7"]);
        assert_eq!(
            visible_gpu_ids(Some("GPU-abc,GPU-def"), 2),
            vec!["GPU-abc", "GPU-def"]
        );
    }
}
