//! The processes a node's runs start (a job's `pre` and `post`, its
//! `!command` values, its instances command), each in a process group of
//! its own, and how they are ended.
//!
//! A script may start children of its own (a dump tool, a `sleep`): killing
//! only the process the agent spawned would leave those behind, re-parented
//! to init. So every script leads a new process group (`setpgid(0, 0)` at
//! spawn, [`tokio::process::Command::process_group`]) and is ended as a
//! group: SIGKILL when its run's task is dropped (a cancel, the runtime
//! shutting down), and, when the agent is stopped, SIGTERM to every group,
//! then SIGKILL to those still there after a grace ([`Scripts::stop`]).
//!
//! Only groups this node started are signalled, and only while their
//! leader is running or not yet reaped, so the group id (the leader's pid)
//! cannot have been given to another process. A group is forgotten once its
//! leader has been waited for; children a script left running after it
//! exited are the script's business.
//!
//! A `kill -9` of the agent ends nothing at that moment: its scripts
//! outlive it. Having the kernel signal them when the agent dies
//! (`PR_SET_PDEATHSIG`) must be set in the child between fork and exec,
//! which takes `unsafe` code (`pre_exec`) that the workspace forbids; it
//! would reach the leader only, not the script's own children; and it fires
//! when the spawning *thread* ends, which tokio's blocking pool does at
//! will. Instead the node keeps a ledger of its running groups in its data
//! directory ([`LEDGER_FILE`]: boot id, group id, the leader's start time),
//! rewritten whenever a script starts or is forgotten, and the next start
//! of the node ends the groups a killed predecessor left behind
//! ([`Scripts::for_node`]). A group is signalled only if it still has
//! members and its leader, if still there, started when the ledger says: a
//! group id cannot be handed out again while any process is in that group,
//! so a group found that way is the one the ledger names. The ledger is not
//! fsynced: a machine crash ends every script anyway, and the boot id
//! tells a ledger of an earlier boot, which is ignored.
//!
//! This module runs what it is given; whether a command may run at all is
//! [`crate::commands::CommandPolicy`]'s decision.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::sync::Notify;

/// Why a script could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The node is stopping: nothing new is started.
    #[error("the {what} command {command:?} was not started: the node is stopping")]
    Stopping {
        /// What the command is for (`pre`, `master_host`, ...).
        what: String,
        /// The command line.
        command: String,
    },
    /// The process could not be started.
    #[error("cannot start the {what} command {command:?}: {source}")]
    Start {
        /// What the command is for.
        what: String,
        /// The command line.
        command: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Waiting for the process or reading its output failed.
    #[error("waiting for the {what} command {command:?}: {source}")]
    Wait {
        /// What the command is for.
        what: String,
        /// The command line.
        command: String,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// The file in a node's data directory listing the process groups of its
/// running scripts, one `BOOT_ID GROUP START_TIME` line each.
pub const LEDGER_FILE: &str = "scripts-running";

/// How long the groups a killed predecessor left behind get between
/// SIGTERM and SIGKILL.
pub const LEFT_BEHIND_GRACE: Duration = Duration::from_secs(5);

/// The scripts a node is running, by the process group each leads.
#[derive(Debug, Default)]
pub struct Scripts {
    state: Mutex<State>,
    /// Told whenever a script is forgotten (its leader waited for).
    forgotten: Notify,
    /// Where the running groups are recorded (none: nowhere).
    ledger: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct State {
    /// Set by [`Scripts::stop`]: no script starts any more.
    stopping: bool,
    next_key: u64,
    running: HashMap<u64, Running>,
}

#[derive(Debug)]
struct Running {
    /// The process group's id: the leader's pid.
    group: Pid,
    /// The leader's start time (clock ticks since boot; 0: unknown).
    started: u64,
    run_id: String,
    what: String,
}

/// What a stop did, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Process groups sent SIGTERM.
    pub terminated: usize,
    /// Of those, the groups still there after the grace, sent SIGKILL.
    pub killed: usize,
}

impl Scripts {
    /// The scripts of a node whose data directory is `data_dir`: first
    /// the groups a killed predecessor left running there are ended (see
    /// the module's doc), then every group started is recorded in its
    /// ledger. Without a usable directory, nothing is recorded.
    pub async fn for_node(data_dir: &Path) -> Self {
        let ledger = data_dir.join(LEDGER_FILE);
        let ended = end_left_behind(&ledger, LEFT_BEHIND_GRACE).await;
        if ended > 0 {
            tracing::warn!(
                groups = ended,
                ledger = %ledger.display(),
                "ended scripts a previous run of this node left behind (it was killed)"
            );
        }
        match std::fs::create_dir_all(data_dir) {
            Ok(()) => Self {
                ledger: Some(ledger),
                ..Self::default()
            },
            Err(error) => {
                tracing::warn!(dir = %data_dir.display(), %error, "cannot create the data directory: scripts left behind by a kill -9 will not be ended at the next start");
                Self::default()
            }
        }
    }

    /// Rewrite the ledger with the groups of `state` (called under the
    /// lock, so writes follow the changes in order).
    fn record(&self, state: &State) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        let boot = boot_id().unwrap_or_default();
        let mut text = String::new();
        for running in state.running.values() {
            text.push_str(&format!(
                "{boot} {} {}\n",
                running.group.as_raw_nonzero(),
                running.started
            ));
        }
        let temporary = ledger.with_extension("tmp");
        if let Err(error) =
            std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, ledger))
        {
            tracing::warn!(ledger = %ledger.display(), %error, "cannot record the running scripts");
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The map stays consistent whatever panicked while holding it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Run `command` (`described` in messages) for run `run_id`'s `what`
    /// in a process group of its own, stdin from /dev/null, and collect
    /// its output. Dropping the future kills the group.
    pub async fn output(
        self: &Arc<Self>,
        mut command: tokio::process::Command,
        described: &str,
        run_id: &str,
        what: &str,
    ) -> Result<Output, ScriptError> {
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // The leader at least, should the group kill below not happen.
            .kill_on_drop(true);
        let (child, group) = {
            let mut state = self.lock();
            if state.stopping {
                return Err(ScriptError::Stopping {
                    what: what.to_owned(),
                    command: described.to_owned(),
                });
            }
            // Spawned under the lock, so that a stop sweeping the groups
            // either sees this one or refused to start it.
            let child = command.spawn().map_err(|source| ScriptError::Start {
                what: what.to_owned(),
                command: described.to_owned(),
                source,
            })?;
            let group = child
                .id()
                .and_then(|pid| i32::try_from(pid).ok())
                .and_then(Pid::from_raw);
            let key = state.next_key;
            state.next_key += 1;
            if let Some(group) = group {
                state.running.insert(
                    key,
                    Running {
                        group,
                        started: process_stat(group.as_raw_nonzero().get())
                            .map_or(0, |stat| stat.started),
                        run_id: run_id.to_owned(),
                        what: what.to_owned(),
                    },
                );
                self.record(&state);
            }
            (child, Registered::new(self, key, group))
        };
        let output = child.wait_with_output().await;
        // Waited for: the group's id may be reused from now on.
        group.finished();
        output.map_err(|source| ScriptError::Wait {
            what: what.to_owned(),
            command: described.to_owned(),
            source,
        })
    }

    /// What run `run_id`'s running script is for (`pre`, `master_host`,
    /// ...), if one runs.
    pub fn doing(&self, run_id: &str) -> Option<String> {
        self.lock()
            .running
            .values()
            .find(|running| running.run_id == run_id)
            .map(|running| running.what.clone())
    }

    /// Whether [`Scripts::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Start no script any more; send SIGTERM to the group of every
    /// running one, wait up to `grace` for their leaders to end, then send
    /// SIGKILL to the groups of those that did not.
    pub async fn stop(&self, grace: Duration) -> Stopped {
        let groups = {
            let mut state = self.lock();
            state.stopping = true;
            groups_of(&state)
        };
        for group in &groups {
            signal_group(*group, Signal::TERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let forgotten = self.forgotten.notified();
            tokio::pin!(forgotten);
            // Registered before looking, so a script forgotten in between
            // still wakes this up.
            forgotten.as_mut().enable();
            if self.lock().running.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, forgotten).await.is_err() {
                break;
            }
        }
        let left = groups_of(&self.lock());
        for group in &left {
            signal_group(*group, Signal::KILL);
        }
        Stopped {
            terminated: groups.len(),
            killed: left.len(),
        }
    }
}

fn groups_of(state: &State) -> Vec<Pid> {
    state
        .running
        .values()
        .map(|running| running.group)
        .collect()
}

fn signal_group(group: Pid, signal: Signal) {
    // ESRCH: the group ended meanwhile, which is what was wanted.
    if let Err(err) = kill_process_group(group, signal)
        && err != rustix::io::Errno::SRCH
    {
        tracing::warn!(group = group.as_raw_nonzero().get(), ?signal, error = %err, "cannot signal a script's process group");
    }
}

/// What `/proc/PID/stat` says of a process, of what this module needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessStat {
    /// Its process group.
    group: i32,
    /// When it started, clock ticks since boot.
    started: u64,
    /// A zombie (or dead): it runs nothing any more.
    zombie: bool,
}

/// Parse a `/proc/PID/stat` line: the fields after the command name's
/// closing parenthesis (the name itself may hold spaces and parentheses).
fn parse_stat(line: &str) -> Option<ProcessStat> {
    let (_, rest) = line.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; field 5 (pgrp) fields[2]; field 22
    // (starttime) fields[19].
    Some(ProcessStat {
        zombie: matches!(*fields.first()?, "Z" | "X"),
        group: fields.get(2)?.parse().ok()?,
        started: fields.get(19)?.parse().ok()?,
    })
}

fn process_stat(pid: i32) -> Option<ProcessStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// This boot's id: ledgers of earlier boots name processes long gone.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// The live (not zombie) processes of process group `group`, with their
/// pids.
fn members_of(group: i32) -> Vec<(i32, ProcessStat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, process_stat(pid)?)))
        .filter(|(_, stat)| stat.group == group && !stat.zombie)
        .collect()
}

/// Whether the group the ledger names as (`group`, leader started at
/// `started`) still runs: it has live members, and its leader, if still
/// one of them, is the process the ledger names.
fn still_running(group: i32, started: u64) -> bool {
    let members = members_of(group);
    match members.iter().find(|(pid, _)| *pid == group) {
        Some((_, leader)) => leader.started == started,
        None => !members.is_empty(),
    }
}

/// End the groups the ledger at `ledger` names that still run (SIGTERM,
/// then SIGKILL after `grace`), then remove the ledger; how many groups
/// were signalled.
pub async fn end_left_behind(ledger: &Path, grace: Duration) -> usize {
    let text = match std::fs::read_to_string(ledger) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(error) => {
            tracing::warn!(ledger = %ledger.display(), %error, "cannot read the scripts a previous run of this node left");
            return 0;
        }
    };
    let boot = boot_id();
    let groups: Vec<i32> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (line_boot, group, started) = (fields.next()?, fields.next()?, fields.next()?);
            let (group, started) = (group.parse::<i32>().ok()?, started.parse::<u64>().ok()?);
            (boot.as_deref() == Some(line_boot) && group > 1 && still_running(group, started))
                .then_some(group)
        })
        .collect();
    let groups: Vec<(i32, Pid)> = groups
        .into_iter()
        .filter_map(|group| Some((group, Pid::from_raw(group)?)))
        .collect();
    for (_, pid) in &groups {
        signal_group(*pid, Signal::TERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline
        && groups
            .iter()
            .any(|(group, _)| !members_of(*group).is_empty())
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (group, pid) in &groups {
        if !members_of(*group).is_empty() {
            signal_group(*pid, Signal::KILL);
        }
    }
    if let Err(error) = std::fs::remove_file(ledger)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(ledger = %ledger.display(), %error, "cannot remove the ledger of scripts left behind");
    }
    groups.len()
}

/// A running script's entry: forgotten when dropped, after killing its
/// group unless its leader was waited for.
struct Registered {
    scripts: Arc<Scripts>,
    key: u64,
    group: Option<Pid>,
    finished: bool,
}

impl Registered {
    fn new(scripts: &Arc<Scripts>, key: u64, group: Option<Pid>) -> Self {
        Self {
            scripts: scripts.clone(),
            key,
            group,
            finished: false,
        }
    }

    fn finished(mut self) {
        self.finished = true;
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Still under the lock: a stop never signals a group whose leader
        // was waited for.
        let mut state = self.scripts.lock();
        if state.running.remove(&self.key).is_some() {
            self.scripts.record(&state);
        }
        if !self.finished
            && let Some(group) = self.group
        {
            // The run's task was dropped (cancelled, or the node is going
            // away) with the script still running: its leader is not reaped
            // yet (tokio's kill_on_drop only queues that), so the id is
            // still this group's.
            signal_group(group, Signal::KILL);
        }
        drop(state);
        self.scripts.forgotten.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(line: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("sh");
        command.arg("-c").arg(line);
        command
    }

    /// Whether process `pid` is gone (or a zombie nobody reaped yet).
    fn gone(pid: i32) -> bool {
        process_stat(pid).is_none_or(|stat| stat.zombie)
    }

    async fn wait_for_file(path: &std::path::Path) -> i32 {
        for _ in 0..2000 {
            if let Ok(text) = std::fs::read_to_string(path)
                && let Ok(pid) = text.trim().parse()
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} was never written", path.display());
    }

    async fn wait_gone(pid: i32) {
        for _ in 0..2000 {
            if gone(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("process {pid} is still there");
    }

    #[tokio::test]
    async fn a_script_runs_in_a_group_of_its_own_and_is_forgotten_after() {
        let scripts = Arc::new(Scripts::default());
        let output = scripts
            .output(shell("ps -o pgid= -p $$; echo $$"), "ps", "run1", "pre")
            .await
            .expect("the script runs");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let numbers: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(numbers.len(), 2, "{text:?}");
        assert_eq!(numbers[0], numbers[1], "the script leads its own group");
        assert_eq!(scripts.doing("run1"), None);
    }

    #[tokio::test]
    async fn stop_ends_every_process_of_a_scripts_group_and_starts_nothing_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shell_pid = dir.path().join("sh.pid");
        let sleep_pid = dir.path().join("sleep.pid");
        let line = format!(
            "echo $$ > {}; sleep 300 & echo $! > {}; wait",
            shell_pid.display(),
            sleep_pid.display()
        );
        let scripts = Arc::new(Scripts::default());
        let running = tokio::spawn({
            let scripts = scripts.clone();
            async move { scripts.output(shell(&line), "pre", "run1", "pre").await }
        });
        let shell_pid = wait_for_file(&shell_pid).await;
        let sleep_pid = wait_for_file(&sleep_pid).await;
        assert_eq!(scripts.doing("run1").as_deref(), Some("pre"));

        let stopped = scripts.stop(Duration::from_secs(30)).await;
        assert_eq!(stopped.terminated, 1);
        let output = running
            .await
            .expect("the task ends")
            .expect("the script was waited for");
        assert!(!output.status.success(), "{output:?}");
        wait_gone(shell_pid).await;
        wait_gone(sleep_pid).await;

        let refused = scripts
            .output(shell("true"), "true", "run2", "post")
            .await
            .expect_err("nothing starts once stopping");
        assert_eq!(
            refused.to_string(),
            "the post command \"true\" was not started: the node is stopping"
        );
    }

    #[tokio::test]
    async fn a_script_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("sh.pid");
        let line = format!("trap '' TERM; echo $$ > {}; sleep 300", pid_file.display());
        let scripts = Arc::new(Scripts::default());
        let running = tokio::spawn({
            let scripts = scripts.clone();
            async move { scripts.output(shell(&line), "pre", "run1", "pre").await }
        });
        let pid = wait_for_file(&pid_file).await;
        // The trap is set before the pid is written; a `sleep` started
        // with SIGTERM ignored ignores it too.
        let stopped = scripts.stop(Duration::from_millis(200)).await;
        assert_eq!(
            stopped,
            Stopped {
                terminated: 1,
                killed: 1
            }
        );
        let _ = running.await;
        wait_gone(pid).await;
    }

    #[tokio::test]
    async fn dropping_a_running_script_kills_its_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sleep_pid = dir.path().join("sleep.pid");
        let line = format!("sleep 300 & echo $! > {}; wait", sleep_pid.display());
        let scripts = Arc::new(Scripts::default());
        let running = tokio::spawn({
            let scripts = scripts.clone();
            async move { scripts.output(shell(&line), "pre", "run1", "pre").await }
        });
        let pid = wait_for_file(&sleep_pid).await;
        running.abort();
        let _ = running.await;
        wait_gone(pid).await;
        assert_eq!(scripts.doing("run1"), None);
    }

    #[test]
    fn a_stat_line_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let line =
            "4242 (a (b) c) S 1 4240 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            parse_stat(line),
            Some(ProcessStat {
                group: 4240,
                started: 987654,
                zombie: false
            })
        );
        assert_eq!(parse_stat("4242 (x) Z 1 7"), None, "too short");
    }

    /// A process leading a group of its own, as a script of a killed agent
    /// would be, and its start time.
    fn orphan_group() -> (std::process::Child, i32, u64) {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let started = process_stat(pid).unwrap().started;
        (child, pid, started)
    }

    #[tokio::test]
    async fn the_groups_a_killed_node_left_are_ended_at_its_next_start_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join(LEDGER_FILE);
        let boot = boot_id().unwrap();
        let (mut left, left_pid, left_started) = orphan_group();
        // A group whose leader started at another time than the ledger
        // says: its id was given to another process.
        let (mut reused, reused_pid, reused_started) = orphan_group();
        // A ledger line of another boot.
        let (mut other_boot, other_pid, other_started) = orphan_group();
        std::fs::write(
            &ledger,
            format!(
                "{boot} {left_pid} {left_started}\n{boot} {reused_pid} {}\nnot-this-boot {other_pid} {other_started}\n",
                reused_started + 1
            ),
        )
        .unwrap();
        assert_eq!(end_left_behind(&ledger, Duration::from_secs(5)).await, 1);
        assert!(left.wait().unwrap().code().is_none(), "ended by a signal");
        assert!(reused.try_wait().unwrap().is_none(), "left alone");
        assert!(other_boot.try_wait().unwrap().is_none(), "left alone");
        assert!(!ledger.exists(), "the ledger is done with");
        for child in [&mut reused, &mut other_boot] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert_eq!(end_left_behind(&ledger, Duration::from_secs(5)).await, 0);
    }

    #[tokio::test]
    async fn a_node_records_each_running_group_in_its_ledger_until_it_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let scripts = Arc::new(Scripts::for_node(&dir.path().join("data")).await);
        let ledger = dir.path().join("data").join(LEDGER_FILE);
        // The script prints the ledger as it is while it runs, and its own
        // pid.
        let output = scripts
            .output(
                shell(&format!("cat {}; echo $$", ledger.display())),
                "cat",
                "run1",
                "pre",
            )
            .await
            .unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let (recorded, pid) = text.trim_end().rsplit_once('\n').unwrap();
        let fields: Vec<&str> = recorded.split_whitespace().collect();
        assert_eq!(fields.len(), 3, "{recorded:?}");
        assert_eq!(fields[0], boot_id().unwrap());
        assert_eq!(fields[1], pid);
        assert_ne!(fields[2], "0", "the leader's start time");
        assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "", "forgotten");
    }
}
