//! CPU time, memory and context switches of a process or thread, from
//! /proc. Linux only; every reader returns `None` when the file is missing
//! (the process exited, or another OS).

use std::time::Duration;

/// Clock ticks per second for /proc times; 100 on every Linux this runs on.
const CLOCK_TICKS: u64 = 100;

/// utime + stime of `/proc/<path>/stat`, e.g. `"1234"` or `"self/task/77"`.
pub fn cpu_time(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{path}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces; fields
    // after it are space-separated: state is field 3, utime 14, stime 15.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / CLOCK_TICKS))
}

/// A `Name:   value kB` field of `/proc/<pid>/status`, in kB (or as is).
pub fn status_field(pid: &str, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Voluntary context switches of every thread of `pid`: how often the
/// process went to sleep and was woken.
pub fn voluntary_switches(pid: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let tid = task.file_name();
        let path = format!("{pid}/task/{}", tid.to_string_lossy());
        total += status_field(&path, "voluntary_ctxt_switches").unwrap_or(0);
    }
    Some(total)
}

/// The calling thread's id, to read its own CPU time.
pub fn thread_id() -> u64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

/// The kernel's count of UDP datagrams dropped because a receive buffer was
/// full, machine-wide (`RcvbufErrors` in /proc/net/snmp).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let at = names.iter().position(|n| *n == "RcvbufErrors")?;
    values.get(at)?.parse().ok()
}
