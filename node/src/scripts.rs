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
//! A `kill -9` of the agent ends nothing: its scripts outlive it. Having the
//! kernel signal them when the agent dies (`PR_SET_PDEATHSIG`) must be set
//! in the child between fork and exec, which takes `unsafe` code
//! (`pre_exec`) that the workspace forbids; and it would reach the leader
//! only, not the script's own children.
//!
//! This module runs what it is given; whether a command may run at all is
//! [`crate::commands::CommandPolicy`]'s decision.

use std::collections::HashMap;
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

/// The scripts a node is running, by the process group each leads.
#[derive(Debug, Default)]
pub struct Scripts {
    state: Mutex<State>,
    /// Told whenever a script is forgotten (its leader waited for).
    forgotten: Notify,
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
                        run_id: run_id.to_owned(),
                        what: what.to_owned(),
                    },
                );
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
        state.running.remove(&self.key);
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
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // The state follows the command name's closing parenthesis.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X"),
        }
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
}
