//! For suites that disturb or inspect the stack they run against: load with faults, DynamoDB
//! paused mid-run, debug logging (`make reliability`, see RELIABILITY.md).
//!
//! Such a suite must never share a stack with the main suite, so its tests start with
//! [`require_dedicated_stack`], which fails (never skips) unless the stack was started for that
//! suite. `infra/devstack.py run` exports where the emulator, `cargo lambda watch` and the logs
//! are (`GW_DYNAMODB_PID`, `GW_WATCH_PID`, `GW_LOG_DIR`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Command;

use crate::{FUNCTIONS, HarnessError, Result, Stack, stack_var};

/// Set by `make reliability` to the suite whose stack a command runs against.
pub const SUITE_VAR: &str = "GW_SUITE";

/// The stack for a disturbing suite, or a loud failure: such tests pause DynamoDB, flood the
/// functions or need debug logging, which would break (or be broken by) any other test sharing
/// the stack.
#[allow(
    clippy::panic,
    reason = "a disturbing test outside its own stack must fail loudly, never skip"
)]
pub fn require_dedicated_stack(suite: &str) -> Stack {
    match std::env::var(SUITE_VAR) {
        Ok(value) if value == suite => Stack::require(),
        other => panic!(
            "this test disturbs the stack it runs against and needs a stack of its own: run \
             `make reliability` (it sets {SUITE_VAR}={suite}); {SUITE_VAR} is {:?}",
            other.ok()
        ),
    }
}

/// Process id from a `GW_*_PID` variable.
fn pid_var(name: &str) -> Result<u32> {
    stack_var(name)?
        .trim()
        .parse()
        .map_err(|_| HarnessError::Unexpected(format!("{name} is not a process id")))
}

fn proc_file(pid: u32, file: &str) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/{file}")).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// `(parent pid, state)` of a process, from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(u32, char)> {
    let raw = proc_file(pid, "stat")?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let mut fields = raw.get(raw.rfind(')')? + 2..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::Unexpected(format!(
            "kill -{signal} {pid} failed ({status})"
        )))
    }
}

/// The DynamoDB emulator, stopped with SIGSTOP until [`PausedEmulator::resume`] or drop.
///
/// SIGSTOP is chosen over kill-and-restart: the emulator keeps its tables and items (moto holds
/// them in memory, so a restart would be a data loss, a different failure), and the kernel keeps
/// accepting connections into the listen backlog, so the functions see the nastiest kind of
/// outage: requests that are sent and never answered, which only their timeouts end. Dropping
/// the guard (also while a failing test unwinds) always sends SIGCONT.
#[derive(Debug)]
pub struct PausedEmulator {
    pid: u32,
    resumed: bool,
}

impl PausedEmulator {
    /// Stops the stack's emulator (`GW_DYNAMODB_PID`), after checking that the pid really is the
    /// emulator of this stack, not a recycled pid.
    pub async fn pause() -> Result<Self> {
        let pid = pid_var("GW_DYNAMODB_PID")?;
        let endpoint = stack_var("AWS_ENDPOINT_URL_DYNAMODB")?;
        let port = endpoint.rsplit(':').next().unwrap_or_default().to_owned();
        let cmdline = proc_file(pid, "cmdline")
            .unwrap_or_default()
            .replace('\0', " ");
        if !cmdline.contains("dynamo_emulator.py") || !cmdline.contains(&format!("--port {port}")) {
            return Err(HarnessError::Unexpected(format!(
                "GW_DYNAMODB_PID {pid} is not this stack's emulator (port {port}): {cmdline:?}"
            )));
        }
        send_signal(pid, "STOP")?;
        let paused = Self {
            pid,
            resumed: false,
        };
        // The signal is delivered asynchronously: wait until the kernel reports the stop.
        for _ in 0..100 {
            if paused.is_stopped() {
                return Ok(paused);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(HarnessError::Unexpected(format!(
            "the emulator (pid {pid}) did not stop within 1 s of SIGSTOP"
        )))
    }

    /// Whether the kernel reports the emulator as stopped (`T`).
    pub fn is_stopped(&self) -> bool {
        stat(self.pid).is_some_and(|(_, state)| state == 'T')
    }

    pub fn resume(mut self) -> Result<()> {
        self.resumed = true;
        send_signal(self.pid, "CONT")
    }
}

impl Drop for PausedEmulator {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = send_signal(self.pid, "CONT");
        }
    }
}

/// Live function processes started by `cargo lambda watch` (`GW_WATCH_PID`), by function name.
/// A function process that died (or was restarted) changes this set.
pub fn function_processes() -> Result<BTreeMap<String, BTreeSet<u32>>> {
    let watch = pid_var("GW_WATCH_PID")?;
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, state)) = stat(pid)
            && state != 'Z'
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut todo = vec![watch];
    let mut seen = BTreeSet::new();
    while let Some(pid) = todo.pop() {
        for &child in children.get(&pid).map_or(&[][..], Vec::as_slice) {
            if !seen.insert(child) {
                continue;
            }
            todo.push(child);
            let comm = proc_file(child, "comm").unwrap_or_default();
            if let Some(name) = FUNCTIONS.iter().find(|f| **f == comm.trim()) {
                found.entry((*name).to_owned()).or_default().insert(child);
            }
        }
    }
    Ok(found)
}

/// Every log file the stack writes (`GW_LOG_DIR`): the functions' output as captured by
/// `cargo lambda watch`, the emulator's and the mock's.
pub fn log_files() -> Result<Vec<PathBuf>> {
    let dir = PathBuf::from(stack_var("GW_LOG_DIR")?);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(HarnessError::Unexpected(format!(
            "no *.log files in GW_LOG_DIR {}",
            dir.display()
        )));
    }
    Ok(files)
}

/// The functions' log (`watch.log`): what they printed, as `cargo lambda watch` relays it.
pub fn function_log() -> Result<String> {
    function_log_since(0)
}

/// How many bytes the functions' log holds now: pass it to [`function_log_since`] later to read
/// only what was written in between.
pub fn function_log_len() -> Result<usize> {
    let path = PathBuf::from(stack_var("GW_LOG_DIR")?).join("watch.log");
    Ok(usize::try_from(std::fs::metadata(path)?.len()).unwrap_or(usize::MAX))
}

/// The functions' log from byte `offset` on.
pub fn function_log_since(offset: usize) -> Result<String> {
    let path = PathBuf::from(stack_var("GW_LOG_DIR")?).join("watch.log");
    let bytes = std::fs::read(&path)?;
    Ok(String::from_utf8_lossy(bytes.get(offset..).unwrap_or_default()).into_owned())
}

/// Lines of the functions' log that show a panic or a crashed function process.
pub fn crash_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| {
            line.contains("panicked at")
                || line.contains("SIGABRT")
                || line.contains("SIGSEGV")
                || line.contains("stack overflow")
        })
        .map(str::to_owned)
        .collect()
}
