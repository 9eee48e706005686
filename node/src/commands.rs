//! Which commands a job may make this agent run: the host's decision, not
//! the coordinator's.
//!
//! A job's `pre`, `post`, `instances` command and `!command` values come
//! from the coordinator; the agent runs one only when its own node.toml
//! allows it ([`CommandPolicy`]):
//! - `allow_commands` entries a command must equal exactly (run with
//!   `sh -c`, as the host wrote it);
//! - entries ending in ` *`: the command must start with the entry's words;
//!   the rest of the job's words become arguments of that program, run
//!   without a shell, so `;`, `|` or `$(...)` in them are only text;
//! - `@NAME` names a hook of `[hooks]`: the host's own command runs.
//!
//! Anything else is refused with a reason that names the setting. The
//! default is to allow nothing. This module decides; it never runs anything.

use std::collections::BTreeMap;

/// How an approved command runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Approved {
    /// With `sh -c`: text the host wrote itself.
    Shell(String),
    /// A program and its arguments, no shell.
    Program(Vec<String>),
}

impl Approved {
    /// The command line, for messages.
    pub fn describe(&self) -> String {
        match self {
            Approved::Shell(command) => command.clone(),
            Approved::Program(words) => shlex::try_join(words.iter().map(String::as_str))
                .unwrap_or_else(|_| words.join(" ")),
        }
    }
}

/// The agent's `allow_commands` and `[hooks]`.
#[derive(Clone, Debug, Default)]
pub struct CommandPolicy {
    node_id: String,
    exact: Vec<String>,
    prefixes: Vec<Vec<String>>,
    hooks: BTreeMap<String, String>,
}

/// A command's text in a message: its start only.
fn shorten(command: &str) -> String {
    fabric_trust::identity::shorten_to(command, 120)
}

impl CommandPolicy {
    /// The policy of node `node_id`; a prefix entry that does not split
    /// into words is an error naming it.
    pub fn new(
        node_id: &str,
        allow_commands: &[String],
        hooks: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let mut policy = Self {
            node_id: node_id.to_owned(),
            hooks: hooks.clone(),
            ..Self::default()
        };
        for entry in allow_commands {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            match entry.strip_suffix(" *") {
                Some(prefix) => {
                    let words = shlex::split(prefix)
                        .filter(|words| !words.is_empty())
                        .ok_or_else(|| {
                            format!("allow_commands entry {entry:?} does not split into words")
                        })?;
                    policy.prefixes.push(words);
                }
                None => policy.exact.push(entry.to_owned()),
            }
        }
        Ok(policy)
    }

    /// How to run `command`, the job's `key` (pre, post, master_host...),
    /// or why it may not run here.
    pub fn approve(&self, key: &str, command: &str) -> Result<Approved, String> {
        let command = command.trim();
        if let Some(name) = command.strip_prefix('@') {
            return self
                .hooks
                .get(name.trim())
                .map(|hook| Approved::Shell(hook.clone()))
                .ok_or_else(|| {
                    let known: Vec<&str> = self.hooks.keys().map(String::as_str).collect();
                    format!(
                        "the {key} hook {:?} is not defined on agent {}: [hooks] in its node.toml has {}",
                        shorten(name),
                        self.node_id,
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    )
                });
        }
        if self.exact.iter().any(|allowed| allowed == command) {
            return Ok(Approved::Shell(command.to_owned()));
        }
        if let Some(words) = shlex::split(command) {
            for prefix in &self.prefixes {
                if words.len() >= prefix.len() && words[..prefix.len()] == prefix[..] {
                    return Ok(Approved::Program(words));
                }
            }
        }
        Err(format!(
            "the {key} command {:?} is not allowed on agent {}: allow_commands in its node.toml must list it (or a prefix ending in ` *`), or the job must name a hook of its [hooks] as @NAME; it allows {}",
            shorten(command),
            self.node_id,
            self.allowed_summary()
        ))
    }

    fn allowed_summary(&self) -> String {
        let count = self.exact.len() + self.prefixes.len();
        if count == 0 && self.hooks.is_empty() {
            "no commands".to_owned()
        } else {
            format!("{count} commands and {} hooks", self.hooks.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> CommandPolicy {
        let hooks = BTreeMap::from([("freeze".to_owned(), "sync; fsfreeze -f /srv".to_owned())]);
        CommandPolicy::new(
            "web1",
            &[
                "/usr/local/bin/db-dump --all".to_owned(),
                "/usr/local/bin/export *".to_owned(),
            ],
            &hooks,
        )
        .unwrap()
    }

    #[test]
    fn nothing_runs_by_default() {
        let none = CommandPolicy::new("web1", &[], &BTreeMap::new()).unwrap();
        let error = none.approve("pre", "touch /tmp/pwned").unwrap_err();
        assert!(
            error.contains("allow_commands") && error.contains("web1"),
            "{error}"
        );
        assert!(error.contains("no commands"), "{error}");
    }

    #[test]
    fn exact_commands_prefixes_and_hooks_are_what_the_host_allows() {
        let policy = policy();
        assert_eq!(
            policy
                .approve("pre", " /usr/local/bin/db-dump --all ")
                .unwrap(),
            Approved::Shell("/usr/local/bin/db-dump --all".into())
        );
        assert!(
            policy
                .approve("pre", "/usr/local/bin/db-dump --all; id")
                .is_err()
        );
        assert_eq!(
            policy
                .approve("post", "/usr/local/bin/export /srv 'a b'")
                .unwrap(),
            Approved::Program(vec![
                "/usr/local/bin/export".into(),
                "/srv".into(),
                "a b".into()
            ])
        );
        // Shell syntax after a prefix is only an argument.
        assert_eq!(
            policy
                .approve("post", "/usr/local/bin/export x; rm -rf /")
                .unwrap(),
            Approved::Program(vec![
                "/usr/local/bin/export".into(),
                "x;".into(),
                "rm".into(),
                "-rf".into(),
                "/".into()
            ])
        );
        // A prefix matches whole words only.
        assert!(policy.approve("pre", "/usr/local/bin/exporter").is_err());
        assert_eq!(
            policy.approve("pre", "@freeze").unwrap(),
            Approved::Shell("sync; fsfreeze -f /srv".into())
        );
        let error = policy.approve("pre", "@thaw").unwrap_err();
        assert!(error.contains("freeze"), "{error}");
        let huge = "x".repeat(100_000);
        assert!(policy.approve("pre", &huge).unwrap_err().len() < 600);
    }
}
