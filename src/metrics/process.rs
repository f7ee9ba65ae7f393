//! The process's own series (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), named as every Prometheus client
//! library names them so that stock dashboards and alerts work unchanged.
//! Read from `/proc/self` at scrape time, on the metrics thread: the event
//! loop pays nothing for them.

use std::fs;

/// One reading of the process's figures; each is `None` where its file
/// cannot be read (e.g. `/proc/stat` under systemd's `ProcSubset=pid`),
/// and is then left out rather than exported as zero.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(super) struct ProcessStats {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, in bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, in bytes.
    pub virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// When the process started, in seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

/// The kernel reports process times in USER_HZ ticks, which the ABI fixes
/// at 100 on every architecture Rust's std targets for Linux (the kernel's
/// own HZ may differ; `/proc` converts).
const TICKS_PER_SECOND: f64 = 100.0;

/// Reads `/proc/self`, each figure on its own.
pub(super) fn read() -> ProcessStats {
    let boot_time = fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|text| boot_time_seconds(&text));
    let mut stats = fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| parse_stat(&stat, boot_time))
        .unwrap_or_default();
    stats.resident_bytes = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| resident_kib(&status))
        .map(|kib| kib * 1024);
    stats.open_fds = fs::read_dir("/proc/self/fd")
        .ok()
        .map(|fds| fds.count() as u64);
    stats.max_fds = fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| parse_max_open_files(&limits));
    stats
}

/// Parses `/proc/self/stat`. The command name (field 2) is in parentheses
/// and may itself contain spaces and parentheses, so fields are counted
/// from the last `)`. The start time needs the boot time.
fn parse_stat(stat: &str, boot_time: Option<u64>) -> Option<ProcessStats> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Field N of proc(5) is fields[N - 3] here (field 3, the state, is first).
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(ProcessStats {
        cpu_seconds: Some((field(14)? + field(15)?) as f64 / TICKS_PER_SECOND),
        virtual_bytes: field(23),
        start_time_seconds: boot_time
            .zip(field(22))
            .map(|(boot, ticks)| boot as f64 + ticks as f64 / TICKS_PER_SECOND),
        ..ProcessStats::default()
    })
}

/// The `btime` line of `/proc/stat`: boot time in seconds since the epoch.
fn boot_time_seconds(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|t| t.trim().parse().ok())
}

/// The `VmRSS` line of `/proc/self/status`, in KiB.
fn resident_kib(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// The soft limit on the "Max open files" line of `/proc/self/limits`.
fn parse_max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let stats = read();
        let resident = stats.resident_bytes.unwrap();
        assert!(resident > 0);
        assert!(stats.virtual_bytes.unwrap() >= resident);
        let open = stats.open_fds.unwrap();
        assert!(open >= 3, "stdin, stdout and stderr at least");
        assert!(stats.max_fds.unwrap() >= open);
        assert!(stats.cpu_seconds.unwrap() >= 0.0);
        let started = stats.start_time_seconds.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(started <= now + 1.0);
        assert!(started > now - 86_400.0 * 365.0);
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_fields() {
        // pid (comm) state ppid ... utime(14) stime(15) ... starttime(22) vsize(23) rss(24)
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 3 0 5000 8192000 300 18446744073709551615";
        let stats = parse_stat(stat, Some(1_000_000)).unwrap();
        assert_eq!(stats.cpu_seconds, Some(4.0));
        assert_eq!(stats.virtual_bytes, Some(8_192_000));
        assert_eq!(stats.start_time_seconds, Some(1_000_050.0));
        // Without the boot time, the rest still stands.
        let stats = parse_stat(stat, None).unwrap();
        assert_eq!(stats.start_time_seconds, None);
        assert_eq!(stats.cpu_seconds, Some(4.0));
    }

    #[test]
    fn parses_the_open_files_limit_and_boot_time() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            boot_time_seconds("cpu 1 2 3\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        assert_eq!(boot_time_seconds("cpu 1 2 3\n"), None);
        assert_eq!(
            resident_kib("Name:\ttether\nVmRSS:\t  109452 kB\n"),
            Some(109_452)
        );
    }
}
