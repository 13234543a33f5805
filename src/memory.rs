//! What this process and this machine hold, as the kernel counts it (`/proc`): the resident
//! size that `/health` and `/metrics` account for, and the memory available when the budgets
//! are sized at start-up. Knows nothing of models or requests.

/// The process's resident size in bytes (0 where `/proc` cannot be read).
pub fn resident_bytes() -> usize {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0);
    pages * page_size()
}

/// The memory the kernel says new work can have without swapping (`MemAvailable`), in bytes.
pub fn available_bytes() -> Option<usize> {
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
}
