//! `--nproc-per-node auto|gpu|cpu|N`, as torchrun resolves it: `gpu` counts the NVIDIA GPUs
//! this process may use, `cpu` the CPUs, `auto` GPUs when there are any, else CPUs.
//!
//! GPUs are counted from the driver's `/proc/driver/nvidia/gpus/<bus id>/` entries (no CUDA or
//! NVML library needed), limited by `CUDA_VISIBLE_DEVICES` as CUDA reads it: entries are taken
//! up to the first invalid one (`-1`, empty, an index out of range), indices and `GPU-`/`MIG-`
//! UUIDs both count.

use std::path::Path;

/// The NVIDIA GPUs the driver lists under `<proc>/driver/nvidia/gpus` (0 without the driver).
pub fn driver_gpus(proc: &Path) -> usize {
    std::fs::read_dir(proc.join("driver/nvidia/gpus"))
        .map(|entries| entries.filter_map(Result::ok).count())
        .unwrap_or(0)
}

/// How many of `installed` GPUs a process may use with `CUDA_VISIBLE_DEVICES = visible`.
pub fn visible_gpus(installed: usize, visible: Option<&str>) -> usize {
    let Some(list) = visible else {
        return installed;
    };
    let mut seen = std::collections::BTreeSet::new();
    for entry in list.split(',').map(str::trim) {
        let valid = match entry.parse::<i64>() {
            Ok(i) => i >= 0 && (i as u64) < installed as u64,
            Err(_) => entry.starts_with("GPU-") || entry.starts_with("MIG-"),
        };
        if !valid || !seen.insert(entry) {
            break;
        }
    }
    seen.len().min(installed)
}

/// Resolves `--nproc-per-node`: a positive number, `cpu`, `gpu` or `auto`, with `gpus` GPUs and
/// `cpus` CPUs available.
///
/// # Errors
/// Anything else, zero, or `gpu` without a GPU: a message for the user.
pub fn nproc_per_node(text: &str, gpus: usize, cpus: usize) -> Result<usize, String> {
    match text.trim() {
        "cpu" => Ok(cpus.max(1)),
        "gpu" if gpus == 0 => Err(
            "`--nproc-per-node gpu`: no NVIDIA GPU is visible (no /proc/driver/nvidia/gpus \
             entries, or CUDA_VISIBLE_DEVICES hides them); give a number or `cpu`"
                .into(),
        ),
        "gpu" => Ok(gpus),
        "auto" if gpus > 0 => Ok(gpus),
        "auto" => Ok(cpus.max(1)),
        n => match n.parse::<usize>() {
            Ok(0) | Err(_) => Err(format!(
                "`{n}` is not a positive number of workers, `auto`, `gpu` or `cpu`"
            )),
            Ok(n) => Ok(n),
        },
    }
}

/// [`nproc_per_node`] on this machine (`/proc`, `CUDA_VISIBLE_DEVICES`, the CPUs this
/// process may run on).
///
/// # Errors
/// As [`nproc_per_node`].
pub fn nproc_per_node_here(text: &str) -> Result<usize, String> {
    let gpus = visible_gpus(
        driver_gpus(Path::new("/proc")),
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    nproc_per_node(text, gpus, cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(gpus: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("driver/nvidia/gpus");
        std::fs::create_dir_all(&base).unwrap();
        for i in 0..gpus {
            std::fs::create_dir(base.join(format!("0000:{i:02x}:00.0"))).unwrap();
        }
        dir
    }

    #[test]
    fn gpus_are_counted_from_the_drivers_proc_entries() {
        assert_eq!(driver_gpus(fake_proc(8).path()), 8);
        assert_eq!(driver_gpus(fake_proc(0).path()), 0);
        let no_driver = tempfile::tempdir().unwrap();
        assert_eq!(driver_gpus(no_driver.path()), 0);
    }

    #[test]
    fn cuda_visible_devices_limits_as_cuda_reads_it() {
        assert_eq!(visible_gpus(8, None), 8);
        assert_eq!(visible_gpus(8, Some("0,1")), 2);
        assert_eq!(visible_gpus(8, Some(" 3 , 5 ")), 2);
        assert_eq!(visible_gpus(8, Some("")), 0);
        assert_eq!(visible_gpus(8, Some("-1")), 0);
        assert_eq!(
            visible_gpus(8, Some("0,-1,2")),
            1,
            "stops at the first invalid"
        );
        assert_eq!(visible_gpus(8, Some("0,9")), 1, "9 is out of range");
        assert_eq!(
            visible_gpus(8, Some("0,0")),
            1,
            "a repeated index stops the list"
        );
        assert_eq!(visible_gpus(2, Some("GPU-aa,GPU-bb,GPU-cc")), 2);
        assert_eq!(visible_gpus(0, Some("0")), 0);
    }

    #[test]
    fn nproc_resolves_as_torchrun() {
        assert_eq!(nproc_per_node("4", 8, 16), Ok(4));
        assert_eq!(nproc_per_node("gpu", 8, 16), Ok(8));
        assert_eq!(nproc_per_node("auto", 8, 16), Ok(8));
        assert_eq!(nproc_per_node("auto", 0, 16), Ok(16));
        assert_eq!(nproc_per_node("cpu", 8, 16), Ok(16));
        assert!(nproc_per_node("gpu", 0, 16)
            .unwrap_err()
            .contains("no NVIDIA GPU"));
        for bad in ["0", "-1", "x", "", "1.5"] {
            assert!(nproc_per_node(bad, 8, 16).is_err(), "{bad}");
        }
    }
}
