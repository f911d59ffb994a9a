//! What `/proc` says about a process (CPU time, RSS), which process listens on a TCP port, and
//! about the machine (load average, cores, memory). Linux only.

use std::fs;
use std::io;

/// `USER_HZ`: the unit of the CPU times in `/proc/<pid>/stat`. Linux fixes it at 100 for user
/// space on every architecture it runs on.
const USER_HZ: f64 = 100.0;

/// A process's CPU time and resident memory at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// utime + stime of all its threads (live and exited), seconds.
    pub cpu_s: f64,
    pub rss_bytes: u64,
}

/// `pid` = `"self"` or a number.
pub fn sample(pid: &str) -> io::Result<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(ProcSample {
        cpu_s: parse_stat_cpu(&stat)
            .ok_or_else(|| io::Error::other(format!("unexpected /proc/{pid}/stat")))?,
        rss_bytes: parse_status_kb(&status, "VmRSS:").unwrap_or(0) * 1024,
    })
}

/// utime + stime (fields 14 and 15) in seconds. The command name (field 2) may contain spaces
/// and parentheses, so fields are counted after its last `)`.
fn parse_stat_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is fields[n - 3].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The process that has a TCP socket listening on `port` (any local address): the socket's
/// inode from `/proc/net/tcp{,6}`, then the process holding `socket:[inode]` in
/// `/proc/*/fd`.
pub fn find_listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let targets: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path())
                && targets.iter().any(|t| link.as_os_str() == t.as_str())
            {
                return Some(pid);
            }
        }
    }
    None
}

/// Inodes of sockets in state LISTEN (`0A`) on `port` in a `/proc/net/tcp` table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let local_port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A")
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> [f64; 3] {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(f64::NAN));
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

/// Machine-wide CPU time from the first line of `/proc/stat`, seconds summed over all cores.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// Everything but idle and iowait.
    pub busy_s: f64,
    /// Time the hypervisor ran something else while a virtual CPU wanted to run.
    pub steal_s: f64,
    pub total_s: f64,
}

pub fn cpu_times() -> CpuTimes {
    parse_cpu_times(&fs::read_to_string("/proc/stat").unwrap_or_default())
}

fn parse_cpu_times(stat: &str) -> CpuTimes {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return CpuTimes::default();
    };
    // user nice system idle iowait irq softirq steal guest guest_nice (guest is in user)
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0) / USER_HZ)
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0);
    let total: f64 = (0..8).map(get).sum();
    CpuTimes {
        busy_s: total - get(3) - get(4) - get(7),
        steal_s: get(7),
        total_s: total,
    }
}

/// The soft limit on open files of this process.
pub fn open_files_limit() -> Option<u64> {
    let text = fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// "model name, N cores, M GiB" from `/proc/cpuinfo` and `/proc/meminfo`.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kb = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| parse_status_kb(&m, "MemTotal:"))
        .unwrap_or(0);
    format!(
        "{model}, {cores} cores, {:.0} GiB",
        mem_kb as f64 / 1024.0 / 1024.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        let stat = "1234 (tokio (w) 1) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 \
                    100 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_cpu(stat), Some(3.25));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn machine_cpu_times() {
        let t = parse_cpu_times("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n");
        assert_eq!(t.busy_s, 1.5);
        assert_eq!(t.steal_s, 0.4);
        assert_eq!(t.total_s, 10.0);
        assert_eq!(parse_cpu_times(""), CpuTimes::default());
    }

    #[test]
    fn status_rss() {
        let status = "Name:\tx\nVmPeak:\t 100 kB\nVmRSS:\t   2048 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS:"), Some(2048));
    }

    #[test]
    fn listening_sockets_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n   \
            1: 0100007F:1F90 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n   \
            2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 8080), vec![4242]);
        assert_eq!(listening_inodes(table, 80), vec![4444]);
        assert!(listening_inodes(table, 1).is_empty());
    }

    #[test]
    fn own_process_is_readable() {
        let s = sample("self").unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.cpu_s >= 0.0);
        assert!(open_files_limit().is_some());
        assert!(!machine().is_empty());
    }
}
