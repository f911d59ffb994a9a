//! What `/proc` says about a process (CPU time, RSS) or one of its threads (CPU time), which
//! process listens on a TCP port, and about the machine (load average, busy and stolen CPU time,
//! cores, memory), read with the [`procfs`] crate. Linux only.

use procfs::process::{FDTarget, Process, Task};
use procfs::{Current as _, CurrentSI as _, KernelStats, LoadAverage};

/// Seconds of `ticks` of the CPU-time clock (`USER_HZ`, 100 on Linux).
fn ticks_to_s(ticks: u64) -> f64 {
    ticks as f64 / procfs::ticks_per_second() as f64
}

/// A process's CPU time and resident memory at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// utime + stime of all its threads (live and exited), seconds.
    pub cpu_s: f64,
    pub rss_bytes: u64,
}

fn sample(process: &Process) -> procfs::ProcResult<ProcSample> {
    let stat = process.stat()?;
    // VmRSS of /proc/<pid>/status (the kernel sums its per-CPU counters for it; the page count
    // in /proc/<pid>/stat may lag behind).
    let rss_kb = process.status().ok().and_then(|s| s.vmrss).unwrap_or(0);
    Ok(ProcSample {
        cpu_s: ticks_to_s(stat.utime + stat.stime),
        rss_bytes: rss_kb * 1024,
    })
}

/// This process (zero if `/proc` is unreadable).
pub fn sample_self() -> ProcSample {
    Process::myself()
        .and_then(|p| sample(&p))
        .unwrap_or_default()
}

/// Process `pid`, if it is (still) there.
pub fn sample_pid(pid: u32) -> Option<ProcSample> {
    let pid = i32::try_from(pid).ok()?;
    Process::new(pid).and_then(|p| sample(&p)).ok()
}

/// The calling thread, as a handle any thread can read its CPU time from (see
/// [`thread_cpu_s`]).
pub fn current_thread() -> Option<Task> {
    // procfs has no call for the calling thread's id; /proc/thread-self is `<pid>/task/<tid>`.
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    let tid: i32 = link.file_name()?.to_str()?.parse().ok()?;
    Process::myself().ok()?.task_from_tid(tid).ok()
}

/// utime + stime of one thread, seconds.
pub fn thread_cpu_s(task: &Task) -> Option<f64> {
    let stat = task.stat().ok()?;
    Some(ticks_to_s(stat.utime + stat.stime))
}

/// The process that has a TCP socket listening on `port` (any local address): the socket's
/// inode from `/proc/net/tcp{,6}`, then the process holding that socket among its fds.
pub fn find_listener_pid(port: u16) -> Option<u32> {
    let tables = [procfs::net::tcp(), procfs::net::tcp6()];
    let inodes = listening_inodes(tables.into_iter().flatten().flatten(), port);
    if inodes.is_empty() {
        return None;
    }
    procfs::process::all_processes()
        .ok()?
        .flatten()
        .find(|process| {
            let holds = |fd: &procfs::process::FDInfo| {
                matches!(fd.target, FDTarget::Socket(inode) if inodes.contains(&inode))
            };
            process
                .fd()
                .is_ok_and(|mut fds| fds.any(|fd| fd.is_ok_and(|fd| holds(&fd))))
        })
        .and_then(|process| u32::try_from(process.pid).ok())
}

/// Inodes of the sockets listening on `port` in socket-table entries.
fn listening_inodes(
    entries: impl IntoIterator<Item = procfs::net::TcpNetEntry>,
    port: u16,
) -> Vec<u64> {
    entries
        .into_iter()
        .filter(|e| e.state == procfs::net::TcpState::Listen && e.local_address.port() == port)
        .map(|e| e.inode)
        .collect()
}

/// The 1, 5 and 15 minute load averages (NaN if unreadable).
pub fn loadavg() -> [f64; 3] {
    match LoadAverage::current() {
        // procfs parses the two-decimal figures into f32: back to the decimals as written, so
        // that 0.85 is 0.85 in the JSON too, not 0.8500000238418579.
        Ok(l) => [l.one, l.five, l.fifteen].map(|v| (f64::from(v) * 100.0).round() / 100.0),
        Err(_) => [f64::NAN; 3],
    }
}

/// Machine-wide CPU time from `/proc/stat`, seconds summed over all cores.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// Everything but idle and iowait.
    pub busy_s: f64,
    /// Time the hypervisor ran something else while a virtual CPU wanted to run.
    pub steal_s: f64,
    pub total_s: f64,
}

/// Zero if `/proc/stat` is unreadable.
pub fn cpu_times() -> CpuTimes {
    KernelStats::current().map_or_else(|_| CpuTimes::default(), |s| cpu_times_of(&s.total))
}

fn cpu_times_of(t: &procfs::CpuTime) -> CpuTimes {
    // user nice system idle iowait irq softirq steal (guest and guest_nice are inside user and
    // nice).
    let (iowait, steal) = (t.iowait.unwrap_or(0), t.steal.unwrap_or(0));
    let total = t.user
        + t.nice
        + t.system
        + t.idle
        + iowait
        + t.irq.unwrap_or(0)
        + t.softirq.unwrap_or(0)
        + steal;
    CpuTimes {
        busy_s: ticks_to_s(total - t.idle - iowait - steal),
        steal_s: ticks_to_s(steal),
        total_s: ticks_to_s(total),
    }
}

/// The soft limit on open files of this process (None: unlimited or unreadable).
pub fn open_files_limit() -> Option<u64> {
    let limits = Process::myself().ok()?.limits().ok()?;
    match limits.max_open_files.soft_limit {
        procfs::process::LimitValue::Value(v) => Some(v),
        procfs::process::LimitValue::Unlimited => None,
    }
}

/// "model name, N cores, M GiB" from `/proc/cpuinfo` and `/proc/meminfo`.
pub fn machine() -> String {
    let cpuinfo = procfs::CpuInfo::current().ok();
    let model = cpuinfo
        .as_ref()
        .and_then(|c| c.model_name(0))
        .unwrap_or("unknown CPU");
    let cores = cpuinfo.as_ref().map_or(0, |c| c.num_cores());
    let mem_bytes = procfs::Meminfo::current().map_or(0, |m| m.mem_total);
    format!(
        "{model}, {cores} cores, {:.0} GiB",
        mem_bytes as f64 / 1024.0 / 1024.0 / 1024.0
    )
}

#[cfg(test)]
mod tests {
    use procfs::FromReadSI as _;

    use super::*;

    fn system_info() -> procfs::ExplicitSystemInfo {
        procfs::ExplicitSystemInfo {
            boot_time_secs: 0,
            ticks_per_second: procfs::ticks_per_second(),
            page_size: 4096,
            is_little_endian: cfg!(target_endian = "little"),
        }
    }

    #[test]
    fn machine_cpu_times() {
        let stat = "cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nctxt 1\nbtime 1\nprocesses 1\n";
        let stats = KernelStats::from_read(stat.as_bytes(), &system_info()).unwrap();
        let t = cpu_times_of(&stats.total);
        let hz = procfs::ticks_per_second() as f64;
        assert_eq!(t.busy_s, 150.0 / hz);
        assert_eq!(t.steal_s, 40.0 / hz);
        assert_eq!(t.total_s, 1000.0 / hz);
        let now = cpu_times();
        assert!(now.total_s > 0.0 && now.busy_s <= now.total_s && now.steal_s <= now.total_s);
    }

    #[test]
    fn listening_sockets_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n   \
            1: 0100007F:1F90 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n   \
            2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0\n";
        let entries = procfs::net::TcpNetEntries::from_read(table.as_bytes(), &system_info())
            .unwrap()
            .0;
        assert_eq!(listening_inodes(entries.clone(), 8080), vec![4242]);
        assert_eq!(listening_inodes(entries.clone(), 80), vec![4444]);
        assert!(listening_inodes(entries, 1).is_empty());
    }

    #[test]
    fn finds_the_process_listening_on_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(find_listener_pid(port), Some(std::process::id()));
        drop(listener);
        assert_eq!(find_listener_pid(port), None);
    }

    #[test]
    fn own_process_and_thread_are_readable() {
        let s = sample_self();
        assert!(s.rss_bytes > 0);
        assert!(s.cpu_s >= 0.0);
        assert_eq!(
            sample_pid(std::process::id()).map(|p| p.rss_bytes > 0),
            Some(true)
        );
        // A thread's handle is its own task, and another thread reads its CPU time from it.
        let thread = current_thread().expect("this thread in /proc");
        assert_eq!(thread.pid as u32, std::process::id());
        let before = thread_cpu_s(&thread).expect("this thread's CPU time");
        std::thread::scope(|s| {
            s.spawn(|| {
                let other = current_thread().expect("the other thread in /proc");
                assert_ne!(other.tid, thread.tid);
                assert!(thread_cpu_s(&thread).is_some_and(|t| t >= before));
            });
        });
        assert!(open_files_limit().is_some());
        let load = loadavg();
        assert!(load.iter().all(|v| v.is_finite() && *v >= 0.0), "{load:?}");
        let m = machine();
        assert!(
            m.contains(" cores, ") && !m.starts_with("unknown CPU, 0 cores"),
            "{m}"
        );
    }
}
