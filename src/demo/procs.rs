//! The demo's child processes: each stage is this same binary, run as in production with the
//! demo's config, its own metrics port and its log in `<run>/logs/<name>.log`.
//!
//! Stopping is SIGTERM, then SIGKILL after a grace period. Every stage is exactly once under any
//! kill, so this only saves restart work. Children run in their own process group: a Ctrl-C at
//! the terminal reaches the demo alone, which stops them in order. Dropping [`Procs`] (an
//! error, or Ctrl-C) stops whatever is still running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct Proc {
    pub name: String,
    pub port: Option<u16>,
    child: tokio::process::Child,
}

pub struct Procs {
    exe: PathBuf,
    config: PathBuf,
    topics: PathBuf,
    pub logs: PathBuf,
    pub running: Vec<Proc>,
    /// The peak resident set (MB) of each stage stopped so far, the largest of its runs.
    peaks: std::collections::BTreeMap<String, f64>,
    /// The CPU seconds (user + system) of each stage stopped so far, summed over its runs.
    cpu_done: std::collections::BTreeMap<String, f64>,
}

/// The last `n` lines of a log, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Adds `p`'s peak resident set to `peaks` (the larger of the two).
fn note(peaks: &mut std::collections::BTreeMap<String, f64>, p: &Proc) {
    let Some(mb) = p.child.id().and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok()).and_then(|s| vm_hwm_kb(&s)).map(|kb| kb as f64 / 1024.0) else { return };
    let at = peaks.entry(p.name.clone()).or_insert(mb);
    *at = at.max(mb);
}

/// The CPU seconds (user + system) `p` has used so far.
fn cpu_of(p: &Proc) -> Option<f64> {
    pid_cpu(p.child.id()?)
}

/// utime + stime (clock ticks) of a `/proc/<pid>/stat` line. The command name, in parentheses,
/// may hold spaces: the fields are counted after its closing parenthesis (state is the first,
/// utime the twelfth, stime the thirteenth).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Busy and total clock ticks of the whole machine (the `cpu` line of `/proc/stat`; idle and
/// iowait are not busy).
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4)?;
    Some((total - idle, total))
}

/// The servers a run uses (Kafka's broker, HQ's and the clinics' MariaDB), found by the local
/// port each listens on, so that a run's CPU can be split between our stages and the servers
/// (`cpu_seconds` of the summary). A server this user cannot see (another user's process, or
/// one on another host) is left out.
pub struct Servers {
    /// (group, pid) of each server found.
    pids: Vec<(String, u32)>,
    /// Each group's CPU seconds when they were found: [`Servers::used`] counts from there.
    start: std::collections::BTreeMap<String, f64>,
}

impl Servers {
    /// `ports`: a group name (`kafka`, `mariadb-hq`, `mariadb-sites`) and a port, each.
    pub fn find(ports: &[(String, u16)]) -> Servers {
        let pids = Self::pids(ports);
        let start = cpu_by_group(&pids);
        Servers { pids, start }
    }

    /// The CPU seconds each group's servers have used since they were found.
    pub fn used(&self) -> std::collections::BTreeMap<String, f64> {
        let start = &self.start;
        cpu_by_group(&self.pids).into_iter().map(|(n, s)| (n.clone(), (s - start.get(&n).copied().unwrap_or(0.0)).max(0.0))).collect()
    }

    fn pids(ports: &[(String, u16)]) -> Vec<(String, u32)> {
        let listening = listening_inodes();
        let wanted: std::collections::HashMap<u64, &str> = ports.iter().filter_map(|(g, port)| listening.get(port).map(|inode| (*inode, g.as_str()))).collect();
        let mut found = Vec::new();
        if wanted.is_empty() {
            return found;
        }
        for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
            let group = fds.flatten().find_map(|fd| {
                let link = std::fs::read_link(fd.path()).ok()?;
                let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok()?;
                wanted.get(&inode).copied()
            });
            if let Some(g) = group {
                found.push((g.to_string(), pid));
            }
        }
        found
    }
}

/// The CPU seconds (since they started) of the processes `pids`, summed by group.
fn cpu_by_group(pids: &[(String, u32)]) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for (g, pid) in pids {
        if let Some(s) = pid_cpu(*pid) {
            *out.entry(g.clone()).or_default() += s;
        }
    }
    out
}

/// Local port → socket inode of every TCP socket in LISTEN state (`/proc/net/tcp` and `tcp6`).
fn listening_inodes() -> std::collections::HashMap<u16, u64> {
    let mut out = std::collections::HashMap::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(f).unwrap_or_default().lines().skip(1) {
            if let Some((port, inode)) = listen_entry(line) {
                out.entry(port).or_insert(inode);
            }
        }
    }
    out
}

/// The local port and inode of a `/proc/net/tcp` line in LISTEN state (`st` 0A).
fn listen_entry(line: &str) -> Option<(u16, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(3)? != &"0A" {
        return None;
    }
    let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
    Some((port, f.get(9)?.parse().ok()?))
}

/// The CPU seconds (user + system) process `pid` has used so far.
fn pid_cpu(pid: u32) -> Option<f64> {
    let ticks = cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// `VmHWM` (kB) of a `/proc/<pid>/status` text: the process's peak resident set.
fn vm_hwm_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn signal(pid: Option<u32>, sig: i32) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory is shared.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

impl Procs {
    pub fn new(exe: PathBuf, config: PathBuf, topics: PathBuf, logs: PathBuf) -> Procs {
        Procs { exe, config, topics, logs, running: Vec::new(), peaks: Default::default(), cpu_done: Default::default() }
    }

    /// The peak resident set (VmHWM, MB) of every stage, by name: of the stages stopped, read
    /// as they were stopped (the largest of a stage's runs), and of those running, now. A stage
    /// whose `/proc` entry cannot be read is left out.
    pub fn peak_rss_mb(&self) -> std::collections::BTreeMap<String, f64> {
        let mut out = self.peaks.clone();
        for p in &self.running {
            note(&mut out, p);
        }
        out
    }

    /// The CPU seconds of every stage, by name: of its runs stopped, and of the one running.
    pub fn cpu_seconds(&self) -> std::collections::BTreeMap<String, f64> {
        let mut out = self.cpu_done.clone();
        for p in &self.running {
            *out.entry(p.name.clone()).or_default() += cpu_of(p).unwrap_or(0.0);
        }
        out
    }

    /// [`Procs::cpu_seconds`] with the CPU `servers` used since they were found.
    pub fn cpu_with(&self, servers: &Servers) -> std::collections::BTreeMap<String, f64> {
        let mut out = self.cpu_seconds();
        out.extend(servers.used());
        out
    }

    /// Notes a stage's peak resident set and CPU time as it stops.
    fn noted(&mut self, p: &Proc) {
        note(&mut self.peaks, p);
        *self.cpu_done.entry(p.name.clone()).or_default() += cpu_of(p).unwrap_or(0.0);
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    fn command(&self, name: &str, args: &[String]) -> anyhow::Result<tokio::process::Command> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .with_context(|| format!("opening {}", self.log_path(name).display()))?;
        let err = log.try_clone().context("duplicating a log file handle")?;
        let mut c = tokio::process::Command::new(&self.exe);
        c.arg("--config")
            .arg(&self.config)
            .arg("--topics")
            .arg(&self.topics)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true);
        Ok(c)
    }

    /// Starts a long-running stage.
    pub fn spawn(&mut self, name: &str, args: &[String], port: Option<u16>) -> anyhow::Result<()> {
        let child = self.command(name, args)?.spawn().with_context(|| format!("starting {name} ({})", self.exe.display()))?;
        tracing::debug!(process = name, pid = child.id(), "started");
        self.running.push(Proc { name: name.to_string(), port, child });
        Ok(())
    }

    /// Runs a stage to its end (e.g. `sink hq-mysql --init`); an exit other than 0 is an error
    /// that quotes the end of its log.
    pub async fn run_to_end(&self, name: &str, args: &[String]) -> anyhow::Result<()> {
        let mut child = self.command(name, args)?.spawn().with_context(|| format!("starting {name}"))?;
        let status = child.wait().await.with_context(|| format!("waiting for {name}"))?;
        if !status.success() {
            bail!("{name} exited with {status}; the end of {}:\n{}", self.log_path(name).display(), tail(&self.log_path(name), 15));
        }
        Ok(())
    }

    /// An error naming the first stage that exited on its own, with the end of its log.
    pub fn check(&mut self) -> anyhow::Result<()> {
        for p in &mut self.running {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = self.logs.join(format!("{}.log", p.name));
                bail!("{} exited unexpectedly with {status}; the end of {}:\n{}", p.name, log.display(), tail(&log, 15));
            }
        }
        Ok(())
    }

    /// Stops one stage: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, name: &str, grace: Duration) {
        let Some(i) = self.running.iter().position(|p| p.name == name) else { return };
        let mut p = self.running.remove(i);
        self.noted(&p);
        signal(p.child.id(), libc::SIGTERM);
        if tokio::time::timeout(grace, p.child.wait()).await.is_err() {
            tracing::warn!(process = name, "did not stop on SIGTERM; killing it");
            let _ = p.child.kill().await;
        }
    }

    /// Stops every stage whose name starts with `prefix`, all at once.
    pub async fn stop_all(&mut self, prefix: &str, grace: Duration) {
        let (stop, keep): (Vec<Proc>, Vec<Proc>) = std::mem::take(&mut self.running).into_iter().partition(|p| p.name.starts_with(prefix));
        self.running = keep;
        for p in &stop {
            self.noted(p);
            signal(p.child.id(), libc::SIGTERM);
        }
        for mut p in stop {
            if tokio::time::timeout(grace, p.child.wait()).await.is_err() {
                let _ = p.child.kill().await;
            }
        }
    }

    pub fn port(&self, name: &str) -> Option<u16> {
        self.running.iter().find(|p| p.name == name).and_then(|p| p.port)
    }
}

impl Drop for Procs {
    /// SIGTERM to everything still running, a short grace, then SIGKILL (by kill_on_drop).
    fn drop(&mut self) {
        if self.running.is_empty() {
            return;
        }
        for p in &self.running {
            signal(p.child.id(), libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until && self.running.iter_mut().any(|p| matches!(p.child.try_wait(), Ok(None))) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in &mut self.running {
            let _ = p.child.start_kill();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_is_read_from_proc_stat() {
        let stat = "4242 (omrs stream) S 1 4242 4242 0 -1 4194304 100 0 0 0 1500 250 0 0 20 0 9 0 1234 5678 90 0";
        assert_eq!(super::cpu_ticks(stat), Some(1750));
        assert_eq!(super::cpu_ticks("garbage"), None);
        let (busy, total) = super::machine_ticks().unwrap();
        assert!(busy <= total && total > 0);
    }

    #[test]
    fn a_listening_socket_is_found_with_its_process() {
        let line = "   1: 0100007F:2384 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 98765 1 0000000000000000 100 0 0 10 0";
        assert_eq!(super::listen_entry(line), Some((9092, 98765)));
        // Not listening (01: established).
        assert_eq!(super::listen_entry(&line.replace(" 0A ", " 01 ")), None);
        assert_eq!(super::listen_entry("garbage"), None);
        // This process, listening on a port of its own, is found by it and its CPU read.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let s = super::Servers::find(&[("self".to_string(), port), ("nobody".to_string(), 1)]);
        assert_eq!(s.pids, vec![("self".to_string(), std::process::id())]);
        assert!(s.used().get("self").is_some_and(|c| *c >= 0.0), "{:?}", s.used());
    }

    #[test]
    fn peak_rss_is_read_from_proc_status() {
        assert_eq!(super::vm_hwm_kb("Name:\tomrs-stream\nVmPeak:\t  900 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 1000 kB\n"), Some(123_456));
        assert_eq!(super::vm_hwm_kb("Name:\tx\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(super::vm_hwm_kb(&own).is_some_and(|kb| kb > 0));
    }
}
