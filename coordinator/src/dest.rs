//! B1000's destination grammar: parsing a job's `dest`, printing it back, and
//! resolving it against the nodes the coordinator knows into an ordered copy
//! plan; and the `replicas = N` choice of distinct healthy storage nodes.
//!
//! The grammar (B1000's, with node ids and labels as names):
//!
//! - names separated by spaces and/or commas are copied to in that order:
//!   `n1 n2`, `n1,n2`;
//! - `a/b/c` is one *group*: copies to a, b and c one after the other, in a
//!   random order drawn at each run;
//! - a trailing `&` starts that copy in the background and goes on with the
//!   next step at once: `hd& tele atm`. On a group it applies to every member:
//!   `a/b&` starts the copies to a and b in the background, in a random order.
//!   `&` may only end a step: `a&/b` and `a&b` are errors;
//! - a name is a node id or, when no node has that id, a label: it stands for
//!   every healthy storage node carrying the label, in a random order (as if
//!   they were written as a group).
//!
//! A node appears at most once in a plan (its first place wins), however many
//! names lead to it. Whatever its background flags, a run waits for all of its
//! copies before its post script.
//!
//! This module owns the grammar and the choice of nodes only. It never talks
//! to a node, never waits, and never decides what to do when a destination
//! cannot be served (wait or fail is the run's policy).

use std::collections::BTreeSet;
use std::fmt;

use fabric_proto::v1::{CopyTarget, Node, NodeRole, NodeState};
use rand::Rng;
use rand::seq::SliceRandom;

/// A parsed `dest`: its steps in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestPlan {
    /// The steps, copied to in this order.
    pub steps: Vec<DestStep>,
}

/// One step of a plan: a single name, or a group copied to in random order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestStep {
    /// One name, or several (`a/b/c`) taken in a random order.
    pub names: Vec<String>,
    /// Start these copies in the background and go on (a trailing `&`).
    pub background: bool,
}

/// What is wrong with a `dest` string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad dest {input:?}: {problem} at column {column}")]
pub struct DestParseError {
    /// The whole `dest` as written.
    pub input: String,
    /// 1-based column (in characters) of the problem.
    pub column: usize,
    /// What is wrong there.
    pub problem: DestProblem,
}

/// The kinds of mistake in a `dest` string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestProblem {
    /// Nothing but separators.
    #[error("no destination named (write node ids or labels, e.g. \"n1& n2/n3\")")]
    Empty,
    /// `a//b`, `/a`, `a/`, or a lone `&`.
    #[error("empty name")]
    EmptyName,
    /// `a&b`, `a&/b`, `a&&`.
    #[error(
        "`&` must end a step (write \"a& b\" to go on after starting a, or \"a/b&\" to start a whole group in the background)"
    )]
    AmpersandInMiddle,
    /// A character that is neither part of a name nor of the grammar.
    #[error(
        "character {0:?} is not allowed (names are letters, digits and `-_.:`; steps are separated by spaces or commas)"
    )]
    BadCharacter(char),
    /// A name that does not start with a letter or digit.
    #[error("name {0:?} must start with a letter or a digit")]
    BadNameStart(String),
}

/// Characters a name may contain besides ASCII letters and digits.
const NAME_PUNCTUATION: &[char] = &['-', '_', '.', ':'];

/// Whether `name` is a well-formed destination name (node id or label).
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) if first.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || NAME_PUNCTUATION.contains(&c))
}

impl DestPlan {
    /// Parses a `dest` string. Errors name the input, the column and the
    /// problem.
    pub fn parse(input: &str) -> Result<DestPlan, DestParseError> {
        let fail = |column: usize, problem: DestProblem| DestParseError {
            input: input.to_owned(),
            column,
            problem,
        };
        let chars: Vec<char> = input.chars().collect();
        let mut steps = Vec::new();
        let mut index = 0;
        while index < chars.len() {
            if chars[index] == ' ' || chars[index] == ',' {
                index += 1;
                continue;
            }
            // One step: names separated by `/`, then an optional `&`.
            let mut names = Vec::new();
            let mut background = false;
            loop {
                let start = index;
                while index < chars.len() && !matches!(chars[index], ' ' | ',' | '/' | '&') {
                    let c = chars[index];
                    if !(c.is_ascii_alphanumeric() || NAME_PUNCTUATION.contains(&c)) {
                        return Err(fail(index + 1, DestProblem::BadCharacter(c)));
                    }
                    index += 1;
                }
                if start == index {
                    return Err(fail(start + 1, DestProblem::EmptyName));
                }
                let name: String = chars[start..index].iter().collect();
                if !is_valid_name(&name) {
                    return Err(fail(start + 1, DestProblem::BadNameStart(name)));
                }
                names.push(name);
                match chars.get(index) {
                    Some('/') => index += 1,
                    Some('&') => {
                        background = true;
                        index += 1;
                        if index < chars.len() && !matches!(chars[index], ' ' | ',') {
                            return Err(fail(index, DestProblem::AmpersandInMiddle));
                        }
                        break;
                    }
                    _ => break,
                }
            }
            steps.push(DestStep { names, background });
        }
        if steps.is_empty() {
            return Err(fail(1, DestProblem::Empty));
        }
        Ok(DestPlan { steps })
    }

    /// Every name the plan mentions, once each, in order of appearance.
    pub fn names(&self) -> Vec<&str> {
        let mut seen = BTreeSet::new();
        self.steps
            .iter()
            .flat_map(|step| step.names.iter())
            .filter(|name| seen.insert(name.as_str()))
            .map(String::as_str)
            .collect()
    }
}

impl fmt::Display for DestPlan {
    /// The canonical form: steps separated by one space, groups by `/`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, step) in self.steps.iter().enumerate() {
            if position > 0 {
                f.write_str(" ")?;
            }
            f.write_str(&step.names.join("/"))?;
            if step.background {
                f.write_str("&")?;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for DestPlan {
    type Err = DestParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        DestPlan::parse(input)
    }
}

/// A node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Its labels.
    pub labels: Vec<String>,
    /// Online (heartbeats arrive).
    pub healthy: bool,
    /// Keeps a chunk store (can receive copies).
    pub storage: bool,
}

impl NodeView {
    /// The planner's view of a node the coordinator knows: healthy while
    /// online, a destination when it has the storage role.
    pub fn from_node(node: &Node) -> NodeView {
        let info = node.info.clone().unwrap_or_default();
        NodeView {
            storage: info.roles.contains(&(NodeRole::Storage as i32)),
            id: info.id,
            labels: info.labels,
            healthy: node.state() == NodeState::Online,
        }
    }

    fn usable(&self) -> bool {
        self.healthy && self.storage
    }
}

/// One copy of a run's plan, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedCopy {
    /// The destination node's id.
    pub node: String,
    /// Start this copy and go on without waiting for it.
    pub background: bool,
}

impl PlannedCopy {
    /// The assignment's form of this copy, with the node's address.
    pub fn into_target(self, address: String) -> CopyTarget {
        CopyTarget {
            node: self.node,
            address,
            background: self.background,
        }
    }
}

/// Why a plan cannot be served now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The name is neither a node id nor a label any node carries.
    #[error("dest {dest:?}: {name:?} is neither a node id nor a label of any node")]
    UnknownName {
        /// The plan, printed.
        dest: String,
        /// The name.
        name: String,
    },
    /// The node exists but cannot take a copy.
    #[error("dest {dest:?}: node {node:?} cannot take a copy: {why}")]
    NodeUnavailable {
        /// The plan, printed.
        dest: String,
        /// The node.
        node: String,
        /// "it is lost" or "it is not a storage node".
        why: &'static str,
    },
    /// No node carrying the label can take a copy.
    #[error(
        "dest {dest:?}: none of the {carriers} node(s) labelled {label:?} is a healthy storage node"
    )]
    LabelUnavailable {
        /// The plan, printed.
        dest: String,
        /// The label.
        label: String,
        /// How many nodes carry it.
        carriers: usize,
    },
    /// `replicas = 0`.
    #[error("replicas must be at least 1")]
    NoReplicas,
    /// Fewer healthy storage nodes than replicas.
    #[error("replicas = {wanted} needs {wanted} healthy storage nodes, but only {available} are")]
    NotEnoughNodes {
        /// Replicas asked for.
        wanted: usize,
        /// Healthy storage nodes there are.
        available: usize,
    },
    /// Fewer failure domains with a healthy storage node than replicas.
    #[error(
        "replicas = {wanted} with spread_by = {key:?} needs healthy storage nodes in {wanted} \
         distinct {key}s (labels {key}:VALUE), but only {available} have one"
    )]
    NotEnoughDomains {
        /// The label key.
        key: String,
        /// Replicas asked for.
        wanted: usize,
        /// Domains with a healthy storage node.
        available: usize,
    },
}

/// Resolves a plan against the known nodes: names become node ids (a label
/// expands to its healthy storage nodes), groups are shuffled with `rng`, and
/// each node is kept once, at its first place.
pub fn resolve<R: Rng + ?Sized>(
    plan: &DestPlan,
    nodes: &[NodeView],
    rng: &mut R,
) -> Result<Vec<PlannedCopy>, ResolveError> {
    let dest = plan.to_string();
    let mut copies: Vec<PlannedCopy> = Vec::new();
    let mut placed = BTreeSet::new();
    for step in &plan.steps {
        let mut members: Vec<&str> = Vec::new();
        for name in &step.names {
            for node in expand_name(&dest, name, nodes)? {
                if !members.contains(&node) {
                    members.push(node);
                }
            }
        }
        members.shuffle(rng);
        for node in members {
            if placed.insert(node) {
                copies.push(PlannedCopy {
                    node: node.to_owned(),
                    background: step.background,
                });
            }
        }
    }
    Ok(copies)
}

/// The node ids a name stands for: the node with that id, or else the usable
/// nodes carrying it as a label (in the order given).
fn expand_name<'n>(
    dest: &str,
    name: &str,
    nodes: &'n [NodeView],
) -> Result<Vec<&'n str>, ResolveError> {
    if let Some(node) = nodes.iter().find(|node| node.id == name) {
        return if !node.storage {
            Err(ResolveError::NodeUnavailable {
                dest: dest.to_owned(),
                node: name.to_owned(),
                why: "it is not a storage node",
            })
        } else if !node.healthy {
            Err(ResolveError::NodeUnavailable {
                dest: dest.to_owned(),
                node: name.to_owned(),
                why: "it is lost",
            })
        } else {
            Ok(vec![node.id.as_str()])
        };
    }
    let carriers: Vec<&NodeView> = nodes
        .iter()
        .filter(|node| node.labels.iter().any(|label| label == name))
        .collect();
    if carriers.is_empty() {
        return Err(ResolveError::UnknownName {
            dest: dest.to_owned(),
            name: name.to_owned(),
        });
    }
    let usable: Vec<&str> = carriers
        .iter()
        .filter(|node| node.usable())
        .map(|node| node.id.as_str())
        .collect();
    if usable.is_empty() {
        return Err(ResolveError::LabelUnavailable {
            dest: dest.to_owned(),
            label: name.to_owned(),
            carriers: carriers.len(),
        });
    }
    Ok(usable)
}

/// The failure domain `key` of a node with `labels`: the value of its label
/// `key:VALUE` (or `key=VALUE`), if it has one.
pub fn domain_of<'l>(labels: &'l [String], key: &str) -> Option<&'l str> {
    labels.iter().find_map(|label| {
        let value = label.strip_prefix(key)?.strip_prefix([':', '='])?;
        (!value.is_empty()).then_some(value)
    })
}

/// `replicas = N`: N distinct healthy storage nodes in a random order, with
/// `spread_by = KEY` each in a failure domain of its own (a node without a
/// `KEY:VALUE` label is not chosen then). All copies run in parallel, so
/// every one is marked background (the run still waits for all of them
/// before its post script).
pub fn pick_replicas<R: Rng + ?Sized>(
    replicas: usize,
    spread_by: Option<&str>,
    nodes: &[NodeView],
    rng: &mut R,
) -> Result<Vec<PlannedCopy>, ResolveError> {
    if replicas == 0 {
        return Err(ResolveError::NoReplicas);
    }
    let mut usable: Vec<&NodeView> = Vec::new();
    for node in nodes.iter().filter(|node| node.usable()) {
        if !usable.iter().any(|seen| seen.id == node.id) {
            usable.push(node);
        }
    }
    if usable.len() < replicas {
        return Err(ResolveError::NotEnoughNodes {
            wanted: replicas,
            available: usable.len(),
        });
    }
    usable.shuffle(rng);
    if let Some(key) = spread_by {
        let mut domains: Vec<&str> = Vec::new();
        usable.retain(|node| match domain_of(&node.labels, key) {
            Some(domain) if !domains.contains(&domain) => {
                domains.push(domain);
                true
            }
            _ => false,
        });
        if usable.len() < replicas {
            return Err(ResolveError::NotEnoughDomains {
                key: key.to_owned(),
                wanted: replicas,
                available: usable.len(),
            });
        }
    }
    Ok(usable
        .into_iter()
        .map(|node| node.id.as_str())
        .take(replicas)
        .map(|node| PlannedCopy {
            node: node.to_owned(),
            background: true,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use fabric_proto::v1::NodeInfo;

    fn step(names: &[&str], background: bool) -> DestStep {
        DestStep {
            names: names.iter().map(|name| (*name).to_owned()).collect(),
            background,
        }
    }

    fn node(id: &str, labels: &[&str]) -> NodeView {
        NodeView {
            id: id.to_owned(),
            labels: labels.iter().map(|label| (*label).to_owned()).collect(),
            healthy: true,
            storage: true,
        }
    }

    fn order(copies: &[PlannedCopy]) -> Vec<&str> {
        copies.iter().map(|copy| copy.node.as_str()).collect()
    }

    #[test]
    fn parses_the_manuals_examples() {
        assert_eq!(
            DestPlan::parse("atm/tele/hd").unwrap().steps,
            vec![step(&["atm", "tele", "hd"], false)]
        );
        assert_eq!(
            DestPlan::parse("hd& tele atm").unwrap().steps,
            vec![
                step(&["hd"], true),
                step(&["tele"], false),
                step(&["atm"], false)
            ]
        );
        assert_eq!(
            DestPlan::parse("hd& tele/atm").unwrap().steps,
            vec![step(&["hd"], true), step(&["tele", "atm"], false)]
        );
        assert_eq!(
            DestPlan::parse(" n1&,, n2 ,n3/n4& ").unwrap().steps,
            vec![
                step(&["n1"], true),
                step(&["n2"], false),
                step(&["n3", "n4"], true)
            ]
        );
        assert_eq!(
            DestPlan::parse("n1&,n2").unwrap().to_string(),
            "n1& n2",
            "prints back in canonical form"
        );
    }

    #[test]
    fn parse_errors_name_input_column_and_problem() {
        let message = |input: &str| DestPlan::parse(input).unwrap_err().to_string();
        assert_eq!(message("a//b"), "bad dest \"a//b\": empty name at column 3");
        assert_eq!(message("/a"), "bad dest \"/a\": empty name at column 1");
        assert_eq!(message("a/ b"), "bad dest \"a/ b\": empty name at column 3");
        assert_eq!(message("a &"), "bad dest \"a &\": empty name at column 3");
        assert_eq!(
            message("a&b"),
            "bad dest \"a&b\": `&` must end a step (write \"a& b\" to go on after starting a, \
             or \"a/b&\" to start a whole group in the background) at column 2"
        );
        assert_eq!(
            DestPlan::parse("a&/b").unwrap_err().problem,
            DestProblem::AmpersandInMiddle
        );
        assert_eq!(
            DestPlan::parse("a&&").unwrap_err().problem,
            DestProblem::AmpersandInMiddle
        );
        assert_eq!(
            message("n1;n2"),
            "bad dest \"n1;n2\": character ';' is not allowed (names are letters, digits and \
             `-_.:`; steps are separated by spaces or commas) at column 3"
        );
        assert_eq!(
            message("n1 -x"),
            "bad dest \"n1 -x\": name \"-x\" must start with a letter or a digit at column 4"
        );
        assert_eq!(
            message(" , "),
            "bad dest \" , \": no destination named (write node ids or labels, e.g. \
             \"n1& n2/n3\") at column 1"
        );
    }

    #[test]
    fn resolves_ids_labels_and_removes_duplicates() {
        let nodes = [
            node("n1", &["ssd"]),
            node("n2", &["ssd", "eu"]),
            node("n3", &["eu"]),
        ];
        let mut rng = StdRng::seed_from_u64(7);
        let plan = DestPlan::parse("n1& eu n2 ssd").unwrap();
        let copies = resolve(&plan, &nodes, &mut rng).unwrap();
        assert_eq!(copies.len(), 3, "each node once: {copies:?}");
        assert_eq!(
            copies[0],
            PlannedCopy {
                node: "n1".into(),
                background: true
            }
        );
        let rest: BTreeSet<&str> = order(&copies[1..]).into_iter().collect();
        assert_eq!(rest, BTreeSet::from(["n2", "n3"]));
        assert!(copies[1..].iter().all(|copy| !copy.background));
    }

    #[test]
    fn resolve_errors_name_the_problem() {
        let mut nodes = vec![node("n1", &["ssd"]), node("n2", &["ssd"])];
        nodes[1].healthy = false;
        let mut rng = StdRng::seed_from_u64(1);
        let fail = |dest: &str, nodes: &[NodeView], rng: &mut StdRng| {
            resolve(&DestPlan::parse(dest).unwrap(), nodes, rng)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            fail("n1 n9", &nodes, &mut rng),
            "dest \"n1 n9\": \"n9\" is neither a node id nor a label of any node"
        );
        assert_eq!(
            fail("n1 n2", &nodes, &mut rng),
            "dest \"n1 n2\": node \"n2\" cannot take a copy: it is lost"
        );
        nodes[0].healthy = false;
        assert_eq!(
            fail("ssd", &nodes, &mut rng),
            "dest \"ssd\": none of the 2 node(s) labelled \"ssd\" is a healthy storage node"
        );
        nodes[0].healthy = true;
        nodes[0].storage = false;
        assert_eq!(
            fail("n1", &nodes, &mut rng),
            "dest \"n1\": node \"n1\" cannot take a copy: it is not a storage node"
        );
        // A label skips its unusable carriers.
        nodes.push(node("n3", &["ssd"]));
        let copies = resolve(&DestPlan::parse("ssd").unwrap(), &nodes, &mut rng).unwrap();
        assert_eq!(order(&copies), vec!["n3"]);
    }

    #[test]
    fn random_group_orders_are_all_reached_and_roughly_uniform() {
        let nodes = [node("a", &[]), node("b", &[]), node("c", &[])];
        let plan = DestPlan::parse("a/b/c").unwrap();
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let draws = 6000;
        let mut counts: BTreeMap<Vec<String>, usize> = BTreeMap::new();
        for _ in 0..draws {
            let copies = resolve(&plan, &nodes, &mut rng).unwrap();
            *counts
                .entry(copies.into_iter().map(|copy| copy.node).collect())
                .or_default() += 1;
        }
        assert_eq!(counts.len(), 6, "all 6 orders occur: {counts:?}");
        let expected = draws as f64 / 6.0;
        let chi_square: f64 = counts
            .values()
            .map(|&count| (count as f64 - expected).powi(2) / expected)
            .sum();
        // 5 degrees of freedom: 20.5 is the 0.1% critical value.
        assert!(chi_square < 20.5, "chi-square {chi_square}: {counts:?}");
        for (order, &count) in &counts {
            let share = count as f64 / draws as f64;
            assert!((0.10..=0.25).contains(&share), "{order:?}: {share}");
        }
    }

    #[test]
    fn background_then_group_gives_both_orders() {
        // The integration scenario of `n1& n2/n3`: n1 first in the background,
        // then n2 and n3 in either order.
        let nodes = [node("n1", &[]), node("n2", &[]), node("n3", &[])];
        let plan = DestPlan::parse("n1& n2/n3").unwrap();
        let mut rng = StdRng::seed_from_u64(42);
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let copies = resolve(&plan, &nodes, &mut rng).unwrap();
            assert_eq!(copies[0].node, "n1");
            assert!(copies[0].background);
            assert!(!copies[1].background && !copies[2].background);
            seen.insert(order(&copies[1..]).join(","));
        }
        assert_eq!(seen, BTreeSet::from(["n2,n3".into(), "n3,n2".into()]));
    }

    #[test]
    fn replicas_are_distinct_healthy_storage_nodes() {
        let mut nodes = vec![
            node("n1", &[]),
            node("n2", &[]),
            node("n3", &[]),
            node("n4", &[]),
        ];
        nodes[3].healthy = false;
        let mut rng = StdRng::seed_from_u64(3);
        let mut chosen_sets = BTreeSet::new();
        for _ in 0..100 {
            let copies = pick_replicas(2, None, &nodes, &mut rng).unwrap();
            let set: BTreeSet<&str> = order(&copies).into_iter().collect();
            assert_eq!(set.len(), 2);
            assert!(!set.contains("n4"));
            assert!(copies.iter().all(|copy| copy.background));
            chosen_sets.insert(order(&copies).join(","));
        }
        assert_eq!(
            chosen_sets.len(),
            6,
            "every ordered pair occurs: {chosen_sets:?}"
        );
        assert_eq!(
            pick_replicas(4, None, &nodes, &mut rng)
                .unwrap_err()
                .to_string(),
            "replicas = 4 needs 4 healthy storage nodes, but only 3 are"
        );
        assert_eq!(
            pick_replicas(0, None, &nodes, &mut rng).unwrap_err(),
            ResolveError::NoReplicas
        );
    }

    #[test]
    fn spread_by_puts_each_replica_in_a_zone_of_its_own() {
        let nodes = vec![
            node("a1", &["zone:a", "disk"]),
            node("a2", &["zone:a"]),
            node("b1", &["zone=b"]),
            node("c1", &["zone:c"]),
            node("x1", &["disk"]),
        ];
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let copies = pick_replicas(3, Some("zone"), &nodes, &mut rng).unwrap();
            let zones: BTreeSet<&str> = copies
                .iter()
                .map(|copy| {
                    let view = nodes.iter().find(|n| n.id == copy.node).unwrap();
                    domain_of(&view.labels, "zone").unwrap()
                })
                .collect();
            assert_eq!(zones.len(), 3, "{copies:?}");
        }
        let err = pick_replicas(4, Some("zone"), &nodes, &mut rng)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3 have one") && err.contains("zone:VALUE"),
            "{err}"
        );
        assert_eq!(domain_of(&["zone:".to_owned()], "zone"), None);
        assert_eq!(domain_of(&["zones:a".to_owned()], "zone"), None);
    }

    #[test]
    fn node_views_from_the_registry() {
        let registered = |roles: Vec<NodeRole>, state: NodeState| Node {
            info: Some(NodeInfo {
                id: "n1".into(),
                labels: vec!["ssd".into()],
                roles: roles.into_iter().map(|role| role as i32).collect(),
                ..NodeInfo::default()
            }),
            state: state as i32,
            ..Node::default()
        };
        let view = NodeView::from_node(&registered(
            vec![NodeRole::Agent, NodeRole::Storage],
            NodeState::Online,
        ));
        assert_eq!(view, {
            let mut expected = node("n1", &["ssd"]);
            expected.storage = true;
            expected
        });
        let agent = NodeView::from_node(&registered(vec![NodeRole::Agent], NodeState::Online));
        assert!(!agent.storage && agent.healthy);
        let lost = NodeView::from_node(&registered(vec![NodeRole::Storage], NodeState::Lost));
        assert!(lost.storage && !lost.healthy);
        let target = PlannedCopy {
            node: "n1".into(),
            background: true,
        }
        .into_target("http://127.0.0.1:7401".into());
        assert_eq!(
            (
                target.node.as_str(),
                target.address.as_str(),
                target.background
            ),
            ("n1", "http://127.0.0.1:7401", true)
        );
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9._:-]{0,6}"
    }

    fn plan_strategy() -> impl Strategy<Value = DestPlan> {
        prop::collection::vec(
            (prop::collection::vec(name_strategy(), 1..4), any::<bool>())
                .prop_map(|(names, background)| DestStep { names, background }),
            1..5,
        )
        .prop_map(|steps| DestPlan { steps })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn print_then_parse_is_identity(plan in plan_strategy()) {
            let printed = plan.to_string();
            prop_assert_eq!(DestPlan::parse(&printed).unwrap(), plan);
        }

        #[test]
        fn any_separators_parse_to_the_same_plan(
            plan in plan_strategy(),
            separators in prop::collection::vec("[ ,]{1,3}", 5),
        ) {
            let mut written = String::new();
            for (position, step) in plan.steps.iter().enumerate() {
                written.push_str(&separators[position % separators.len()]);
                written.push_str(&step.names.join("/"));
                if step.background {
                    written.push('&');
                }
            }
            prop_assert_eq!(DestPlan::parse(&written).unwrap(), plan);
        }

        #[test]
        fn resolved_plan_keeps_each_node_once_in_step_order(
            plan in plan_strategy(),
            seed in any::<u64>(),
        ) {
            let nodes: Vec<NodeView> = plan
                .names()
                .into_iter()
                .map(|name| node(name, &[]))
                .collect();
            let copies = resolve(&plan, &nodes, &mut StdRng::seed_from_u64(seed)).unwrap();
            let resolved: Vec<&str> = order(&copies);
            let distinct: BTreeSet<&str> = resolved.iter().copied().collect();
            prop_assert_eq!(distinct.len(), resolved.len());
            prop_assert_eq!(distinct, plan.names().into_iter().collect::<BTreeSet<_>>());
            // Each node sits in the step of its first mention, with its flag,
            // and steps keep their order.
            let mut last_step = 0;
            for copy in &copies {
                let first_step = plan
                    .steps
                    .iter()
                    .position(|step| step.names.contains(&copy.node))
                    .unwrap();
                prop_assert!(first_step >= last_step);
                prop_assert_eq!(copy.background, plan.steps[first_step].background);
                last_step = first_step;
            }
        }

        #[test]
        fn every_order_of_a_group_is_reached(seed in any::<u64>()) {
            // Missing one of 6 orders in 600 fair draws has a probability
            // of about 1e-47: this cannot flake.
            let nodes = [node("a", &[]), node("b", &[]), node("c", &[])];
            let plan = DestPlan::parse("a/b/c").unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut seen = BTreeSet::new();
            for _ in 0..600 {
                seen.insert(order(&resolve(&plan, &nodes, &mut rng).unwrap()).join(""));
            }
            prop_assert_eq!(seen.len(), 6);
        }

        #[test]
        fn garbage_never_panics(input in "[a-z/&, ;-]{0,12}") {
            let _ = DestPlan::parse(&input);
        }
    }
}
