//! What this process and this machine hold, as the kernel counts it (`/proc`): the resident
//! size that `/health` and `/metrics` account for, and the memory available when the budgets
//! are sized at start-up. Knows nothing of models or requests.

use std::path::Path;

/// The process's resident size in bytes (0 where `/proc` cannot be read).
pub fn resident_bytes() -> usize {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0);
    pages * page_size()
}

/// The memory new work can have: the kernel's `MemAvailable`, or less when this process's
/// control group (a systemd unit's `MemoryMax=`, a container's limit) leaves less room under
/// its limit, or that of a group above it. In bytes; `None` when neither can be read.
pub fn available_bytes() -> Option<usize> {
    let system = meminfo_available();
    let group = cgroup_headroom(&std::fs::read_to_string("/proc/self/cgroup").ok()?, Path::new("/sys/fs/cgroup"));
    match (system, group) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn meminfo_available() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// The least room left under a memory limit, over the groups that `proc_cgroup` (the text of
/// `/proc/self/cgroup`) puts this process in and their parents, below `root`. Both cgroup
/// versions: v2 (`memory.max`, `memory.current`) and v1 (`memory.limit_in_bytes`,
/// `memory.usage_in_bytes`). File cache the kernel can drop (`inactive_file`) counts as room.
fn cgroup_headroom(proc_cgroup: &str, root: &Path) -> Option<usize> {
    let mut least: Option<usize> = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let (base, limit, usage) = if controllers.is_empty() {
            let v2 = if root.join("unified").is_dir() { root.join("unified") } else { root.to_path_buf() };
            (v2, "memory.max", "memory.current")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")
        } else {
            continue;
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        while dir.starts_with(&base) {
            if let Some(room) = room_in(&dir, limit, usage) {
                least = Some(least.map_or(room, |l| l.min(room)));
            }
            if !dir.pop() {
                break;
            }
        }
    }
    least
}

/// Room under one group's limit, if it has one.
fn room_in(dir: &Path, limit: &str, usage: &str) -> Option<usize> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok()?.trim().parse::<usize>().ok();
    // "max" (v2) does not parse; v1 writes "no limit" as a number near 2^63.
    let limit = read(limit).filter(|&l| l < 1 << 60)?;
    let usage = read(usage)?;
    let droppable = std::fs::read_to_string(dir.join("memory.stat")).ok().and_then(|stat| {
        stat.lines().find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            matches!(key, "inactive_file" | "total_inactive_file").then(|| value.trim().parse::<usize>().ok())?
        })
    });
    Some(limit.saturating_sub(usage.saturating_sub(droppable.unwrap_or(0))))
}

/// Caps the C allocator's arenas at two per CPU (glibc's default is eight), unless
/// `MALLOC_ARENA_MAX` chooses. Each thread that allocates takes an arena and each arena keeps
/// some pages; threads come and go with each model load, so after many sleeps and wakes the
/// arenas, not the model, decide the resident size. Call before any thread starts.
pub fn cap_allocator_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(2 * cpus).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a tunable of the allocator, under its lock.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Hands memory the C allocator keeps after frees back to the system: after the model is
/// released, ONNX Runtime's freed weights and arenas would otherwise stay resident in malloc's
/// heaps. glibc only; other C libraries return large blocks by themselves.
pub fn give_back_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and trims the allocator's own heaps, under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_reports_this_process_and_the_machine() {
        assert!(resident_bytes() > 1 << 20);
        assert!(available_bytes().is_some_and(|b| b > 1 << 20));
        assert_eq!(page_size().count_ones(), 1);
    }

    #[test]
    fn the_tightest_group_limit_on_the_way_up_counts_in_either_cgroup_version() {
        let root = std::env::temp_dir().join(format!("chatd-cgroup-test-{}", std::process::id()));
        let write = |dir: &str, files: &[(&str, &str)]| {
            let dir = root.join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, text) in files {
                std::fs::write(dir.join(name), text).unwrap();
            }
        };
        // v1: a unit limited to 1 GiB using 300 MiB (100 MiB of it droppable file cache) in a
        // slice limited to 2 GiB using 1.5 GiB; the root has no limit.
        write("memory", &[("memory.limit_in_bytes", "9223372036854771712"), ("memory.usage_in_bytes", "1")]);
        write("memory/box.slice", &[("memory.limit_in_bytes", "2147483648"), ("memory.usage_in_bytes", "1610612736")]);
        write(
            "memory/box.slice/chatd.service",
            &[
                ("memory.limit_in_bytes", "1073741824"),
                ("memory.usage_in_bytes", "314572800"),
                ("memory.stat", "cache 1\ntotal_inactive_file 104857600\n"),
            ],
        );
        let v1 = "4:memory:/box.slice/chatd.service\n3:cpu:/\n";
        // The slice leaves 512 MiB, less than the unit's 800.
        assert_eq!(cgroup_headroom(v1, &root), Some(512 << 20));
        // v2: `max` is no limit.
        write("unified/app", &[("memory.max", "max"), ("memory.current", "5")]);
        write("unified/app/chatd", &[("memory.max", "1073741824"), ("memory.current", "104857600")]);
        assert_eq!(cgroup_headroom("0::/app/chatd\n", &root), Some(924 << 20));
        assert_eq!(cgroup_headroom("0::/app\n", &root), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
