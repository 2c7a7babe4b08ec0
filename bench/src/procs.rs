//! What /proc says about the processes under test: CPU time, resident and
//! proportional memory, and process trees (OpenSSH forks per connection).

use std::path::Path;

/// Clock ticks per second for /proc/<pid>/stat times.
pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Fields of /proc/<pid>/stat after the command name; field N of proc(5) is
/// index N - 3 here.
fn stat(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(
        after
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU seconds of `pid` (all threads), plus its reaped children's with
/// `children` (an sshd listener reaps its per-connection processes).
pub fn cpu_seconds(pid: u32, children: bool) -> f64 {
    let Some(f) = stat(pid) else { return 0.0 };
    // utime(14) stime(15) cutime(16) cstime(17) -> indexes 10..=13 here
    // (state was skipped, so ppid(4) is index 0).
    let own = f[10] + f[11];
    let reaped = if children { f[12] + f[13] } else { 0 };
    (own + reaped) as f64 / clk_tck()
}

/// CPU seconds of this process's children that it has waited for (all
/// their waited-for descendants included): across one `Command::output`,
/// the client side of a run, i.e. the shell and the `ssh` processes in it.
pub fn reaped_children_seconds() -> f64 {
    cpu_seconds(std::process::id(), true) - cpu_seconds(std::process::id(), false)
}

/// CPU seconds the whole machine has been busy (all cores; everything but
/// idle and iowait in /proc/stat).
pub fn machine_busy_seconds() -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy as f64 / clk_tck()
}

fn ppid(pid: u32) -> Option<u32> {
    stat(pid).map(|f| f[0] as u32)
}

/// `root` and every process below it.
pub fn tree(root: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, ppid(pid)?)))
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Proportional set size of one process in KiB (shared pages divided
/// among their sharers): the fair measure for forked servers.
pub fn pss_kib(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/smaps_rollup");
    if !Path::new(&path).exists() {
        return rss_kib(pid);
    }
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

pub fn pss_tree_kib(root: u32) -> u64 {
    tree(root).into_iter().map(pss_kib).sum()
}

/// Open file descriptors of `pid` (sockets still held show here).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
