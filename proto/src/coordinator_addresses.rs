//! The coordinators a node or `fabricctl` is given, and which one to dial
//! next. Pure: no sockets, no clock, no tonic (the callers dial, time and
//! sleep).
//!
//! Several coordinators may run against one etcd; one leads and the others
//! answer every `fabric.v1.Coordinator` call with UNAVAILABLE, naming the
//! leader in the metadata key [`LEADER_METADATA_KEY`] when they know it. A
//! caller is given every coordinator's address (`--coordinator
//! https://c1:7400,https://c2:7400`, [`CoordinatorAddresses::parse`]) and
//! keeps a [`LeaderSearch`]: it dials [`LeaderSearch::current`]; after a
//! failure (no connection, UNAVAILABLE, a broken stream) it calls
//! [`LeaderSearch::failed`] with the hint, if any, and dials the address it
//! is moved to after the [`Step`]'s wait. A hint is followed at once; the
//! next address in the list too, until a round has tried the whole list:
//! then the caller waits its backoff. A hint to an address already tried in
//! the round, or more than [`MAX_HINTS_PER_ROUND`] hints in one round, is
//! not followed, so hints that point in circles cannot make a caller dial
//! without pause.

use std::fmt;
use std::time::Duration;

/// The ASCII metadata key a coordinator that does not lead sets to the
/// leader's advertised address (`https://host:port`, `http://` in
/// plaintext mode) on its UNAVAILABLE; absent while no leader is known.
pub const LEADER_METADATA_KEY: &str = "fabric-leader";

/// Hints a [`LeaderSearch`] follows in one round at most (a round ends
/// when the whole list was tried and the caller waits its backoff).
pub const MAX_HINTS_PER_ROUND: usize = 4;

/// How an address says it is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// `http://`: plaintext (`--insecure-plaintext`).
    Http,
    /// `https://`: TLS.
    Https,
}

/// One coordinator address: `https://host:port`, `http://host:port`, or a
/// bare `host:port` (the caller's transport picks the scheme). The host is
/// a name, an IPv4 address or a bracketed IPv6 address; the port may be
/// left out (443 for https, 80 for http).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorAddress {
    text: String,
    scheme: Option<Scheme>,
    host: String,
    port: Option<u16>,
}

/// Why a text is not a coordinator address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressProblem {
    /// Nothing at all.
    Empty,
    /// A scheme other than http or https.
    UnknownScheme(String),
    /// No host before the port.
    NoHost,
    /// A character no host name or address has.
    BadHost(String),
    /// A port that is not a number from 1 to 65535.
    BadPort(String),
    /// Something after `host:port` (a path, a query, user information).
    Trailing(String),
}

impl fmt::Display for AddressProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "it is empty"),
            Self::UnknownScheme(scheme) => {
                write!(f, "scheme {scheme:?} is neither https nor http")
            }
            Self::NoHost => write!(f, "it names no host"),
            Self::BadHost(host) => write!(f, "{host:?} is not a host name or IP address"),
            Self::BadPort(port) => write!(f, "port {port:?} is not a number from 1 to 65535"),
            Self::Trailing(rest) => write!(
                f,
                "{rest:?} follows host:port (a coordinator address is scheme://host:port and nothing more)"
            ),
        }
    }
}

impl std::error::Error for AddressProblem {}

fn valid_host_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

fn valid_ipv6(inner: &str) -> bool {
    inner.parse::<std::net::Ipv6Addr>().is_ok()
}

impl CoordinatorAddress {
    /// Parse one address (surrounding spaces ignored, one trailing `/`
    /// dropped).
    pub fn parse(text: &str) -> Result<Self, AddressProblem> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AddressProblem::Empty);
        }
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "https" => (Some(Scheme::Https), rest),
                "http" => (Some(Scheme::Http), rest),
                _ => return Err(AddressProblem::UnknownScheme(scheme.to_owned())),
            },
            None => (None, text),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if let Some(at) = authority.find(['/', '?', '#', '@']) {
            return Err(AddressProblem::Trailing(authority[at..].to_owned()));
        }
        let (host, port_text) = if let Some(bracketed) = authority.strip_prefix('[') {
            let Some((inner, after)) = bracketed.split_once(']') else {
                return Err(AddressProblem::BadHost(authority.to_owned()));
            };
            if !valid_ipv6(inner) {
                return Err(AddressProblem::BadHost(format!("[{inner}]")));
            }
            let port = match after {
                "" => None,
                after => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => return Err(AddressProblem::Trailing(after.to_owned())),
                },
            };
            (format!("[{}]", inner.to_ascii_lowercase()), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host.to_ascii_lowercase(), Some(port)),
                None => (authority.to_ascii_lowercase(), None),
            }
        };
        if host.is_empty() {
            return Err(AddressProblem::NoHost);
        }
        if !host.starts_with('[') && !valid_host_name(&host) {
            return Err(AddressProblem::BadHost(host));
        }
        let port = match port_text {
            None => None,
            Some(port) => match port.parse::<u16>() {
                Ok(number) if number > 0 && port.chars().all(|c| c.is_ascii_digit()) => {
                    Some(number)
                }
                _ => return Err(AddressProblem::BadPort(port.to_owned())),
            },
        };
        let mut normal = String::new();
        match scheme {
            Some(Scheme::Https) => normal.push_str("https://"),
            Some(Scheme::Http) => normal.push_str("http://"),
            None => {}
        }
        normal.push_str(&host);
        if let Some(port) = port {
            normal.push_str(&format!(":{port}"));
        }
        Ok(Self {
            text: normal,
            scheme,
            host,
            port,
        })
    }

    /// The address to dial: the scheme (if given), host and port, the
    /// host in lower case.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its scheme, when it gives one.
    pub fn scheme(&self) -> Option<Scheme> {
        self.scheme
    }

    /// Whether `other` reaches the same server: the same host and port
    /// (a port left out is its scheme's default), whatever the scheme.
    pub fn same_server(&self, other: &Self) -> bool {
        self.host == other.host && self.effective_port() == other.effective_port()
    }

    fn effective_port(&self) -> Option<u16> {
        self.port.or(match self.scheme {
            Some(Scheme::Https) => Some(443),
            Some(Scheme::Http) => Some(80),
            None => None,
        })
    }
}

impl fmt::Display for CoordinatorAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A list of coordinator addresses that does not parse, naming the list,
/// the element and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressListError {
    /// The whole list as given.
    pub list: String,
    /// The element's place, from 1.
    pub position: usize,
    /// The element as given.
    pub element: String,
    /// What is wrong with it.
    pub problem: AddressProblem,
}

impl fmt::Display for AddressListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.problem == AddressProblem::Empty {
            if self.list.trim().is_empty() {
                return write!(f, "no coordinator address given");
            }
            return write!(
                f,
                "coordinator addresses {:?}: element {} is empty (give addresses separated by single commas)",
                self.list, self.position
            );
        }
        write!(
            f,
            "coordinator addresses {:?}: element {} ({:?}) is not an address: {}",
            self.list,
            self.position,
            self.element.trim(),
            self.problem
        )
    }
}

impl std::error::Error for AddressListError {}

/// Every coordinator's address, in the order given; never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorAddresses(Vec<CoordinatorAddress>);

impl CoordinatorAddresses {
    /// Parse a comma-separated list (`https://c1:7400,https://c2:7400`; one
    /// address is a list of one). An empty element, or one that is not an
    /// address, is an error naming it.
    pub fn parse(list: &str) -> Result<Self, AddressListError> {
        Self::from_elements(list, list.split(','))
    }

    /// Parse addresses given one by one (a TOML array), each of which may
    /// itself be a comma-separated list; `list` names them in errors.
    pub fn from_elements<'a>(
        list: &str,
        elements: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, AddressListError> {
        let mut addresses = Vec::new();
        for (index, element) in elements.into_iter().enumerate() {
            let address =
                CoordinatorAddress::parse(element).map_err(|problem| AddressListError {
                    list: list.to_owned(),
                    position: index + 1,
                    element: element.to_owned(),
                    problem,
                })?;
            addresses.push(address);
        }
        if addresses.is_empty() {
            return Err(AddressListError {
                list: list.to_owned(),
                position: 1,
                element: String::new(),
                problem: AddressProblem::Empty,
            });
        }
        Ok(Self(addresses))
    }

    /// The addresses, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &CoordinatorAddress> {
        self.0.iter()
    }

    /// How many there are (at least one).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a list has at least one address.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first address.
    pub fn first(&self) -> &CoordinatorAddress {
        &self.0[0]
    }
}

impl fmt::Display for CoordinatorAddresses {
    /// The list as `--coordinator` takes it back: addresses joined by commas.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, address) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            f.write_str(address.as_str())?;
        }
        Ok(())
    }
}

/// A wait that doubles after each use, from `first` up to `max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Start at `first`, double up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The wait to use now; the one after is twice as long (at most `max`).
    pub fn take(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Back to `first` (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// What [`LeaderSearch::failed`] decided: the caller waits `wait`, then
/// dials [`LeaderSearch::current`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// How long to wait first: zero for a hint and within a round, the
    /// backoff at the end of a round.
    pub wait: Duration,
    /// Whether the address is the hint the failure carried.
    pub followed_hint: bool,
    /// Whether this failure ended a round: every listed address was tried
    /// since the last success or the last backoff.
    pub round_ended: bool,
}

/// Which coordinator to dial: the one that answered last, else the list
/// in order, following the hints that coordinators which do not lead give.
#[derive(Clone, Debug)]
pub struct LeaderSearch {
    addresses: CoordinatorAddresses,
    /// The list's element the search is at (a hint does not move it).
    position: usize,
    /// The address to dial: `addresses[position]`, or a hint.
    current: CoordinatorAddress,
    /// The addresses dialled in this round, `current` included.
    tried: Vec<CoordinatorAddress>,
    /// How often this round moved along the list.
    list_moves: usize,
    /// How many hints this round followed.
    hints_followed: usize,
    backoff: Backoff,
}

impl LeaderSearch {
    /// Start at the first address, with `backoff` between rounds.
    pub fn new(addresses: CoordinatorAddresses, backoff: Backoff) -> Self {
        let current = addresses.first().clone();
        Self {
            tried: vec![current.clone()],
            current,
            addresses,
            position: 0,
            list_moves: 0,
            hints_followed: 0,
            backoff,
        }
    }

    /// The address to dial now.
    pub fn current(&self) -> &CoordinatorAddress {
        &self.current
    }

    /// The list the search goes through.
    pub fn addresses(&self) -> &CoordinatorAddresses {
        &self.addresses
    }

    /// The current address answered as the leader: stay with it, and
    /// start the next search with a fresh round and the first backoff.
    pub fn succeeded(&mut self) {
        self.start_round();
        self.backoff.reset();
    }

    fn start_round(&mut self) {
        self.tried = vec![self.current.clone()];
        self.list_moves = 0;
        self.hints_followed = 0;
    }

    fn tried(&self, address: &CoordinatorAddress) -> bool {
        self.tried.iter().any(|tried| tried.same_server(address))
    }

    /// Dialling [`Self::current`] failed (no connection, UNAVAILABLE, a
    /// stream that broke), with the leader `hint` its answer carried, if
    /// any: move to the hint when it is worth following, else to the next
    /// listed address not yet tried in this round; when the round has
    /// gone through the whole list, back to the list's next address after
    /// the backoff. A hint that does not parse is ignored.
    pub fn failed(&mut self, hint: Option<&str>) -> Step {
        let hint = hint.and_then(|hint| CoordinatorAddress::parse(hint).ok());
        if let Some(hint) = hint
            && self.hints_followed < MAX_HINTS_PER_ROUND
            && !self.tried(&hint)
        {
            self.hints_followed += 1;
            self.tried.push(hint.clone());
            self.current = hint;
            return Step {
                wait: Duration::ZERO,
                followed_hint: true,
                round_ended: false,
            };
        }
        let count = self.addresses.len();
        loop {
            self.position = (self.position + 1) % count;
            self.list_moves += 1;
            let next = self.addresses.0[self.position].clone();
            if self.list_moves >= count {
                let wait = self.backoff.take();
                self.current = next;
                self.start_round();
                return Step {
                    wait,
                    followed_hint: false,
                    round_ended: true,
                };
            }
            if !self.tried(&next) {
                self.tried.push(next.clone());
                self.current = next;
                return Step {
                    wait: Duration::ZERO,
                    followed_hint: false,
                    round_ended: false,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(text: &str) -> CoordinatorAddresses {
        CoordinatorAddresses::parse(text).expect("a valid list")
    }

    fn search(text: &str) -> LeaderSearch {
        LeaderSearch::new(
            list(text),
            Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
        )
    }

    const MS_200: Duration = Duration::from_millis(200);

    #[test]
    fn one_address_is_a_list_of_one_kept_as_given() {
        let one = list("https://coordinator:7400");
        assert_eq!(one.len(), 1);
        assert_eq!(one.first().as_str(), "https://coordinator:7400");
        assert_eq!(one.to_string(), "https://coordinator:7400");
        assert_eq!(list("127.0.0.1:7400").first().as_str(), "127.0.0.1:7400");
        assert_eq!(list("127.0.0.1:7400").first().scheme(), None);
    }

    #[test]
    fn a_list_is_split_on_commas_and_trimmed() {
        let three = list(" https://c1:7400, HTTPS://C2:7400/ ,http://[::1]:7400");
        let texts: Vec<&str> = three.iter().map(CoordinatorAddress::as_str).collect();
        assert_eq!(
            texts,
            ["https://c1:7400", "https://c2:7400", "http://[::1]:7400"]
        );
        assert_eq!(
            three.to_string(),
            "https://c1:7400,https://c2:7400,http://[::1]:7400"
        );
    }

    #[test]
    fn bad_elements_are_named_with_the_list() {
        let err = CoordinatorAddresses::parse("https://c1:7400,,https://c2:7400").unwrap_err();
        assert_eq!(err.position, 2);
        assert_eq!(
            err.to_string(),
            "coordinator addresses \"https://c1:7400,,https://c2:7400\": element 2 is empty (give addresses separated by single commas)"
        );
        let err = CoordinatorAddresses::parse("https://c1:7400,").unwrap_err();
        assert_eq!(err.position, 2);
        assert_eq!(
            CoordinatorAddresses::parse("").unwrap_err().to_string(),
            "no coordinator address given"
        );
        let err = CoordinatorAddresses::parse("https://c1:7400,ftp://c2:21").unwrap_err();
        assert_eq!(
            err.to_string(),
            "coordinator addresses \"https://c1:7400,ftp://c2:21\": element 2 (\"ftp://c2:21\") is not an address: scheme \"ftp\" is neither https nor http"
        );
        for (text, problem) in [
            ("https://", AddressProblem::NoHost),
            ("https://:7400", AddressProblem::NoHost),
            ("https://c1:http", AddressProblem::BadPort("http".into())),
            ("https://c1:0", AddressProblem::BadPort("0".into())),
            ("https://c1:70000", AddressProblem::BadPort("70000".into())),
            ("https://c1:+80", AddressProblem::BadPort("+80".into())),
            ("c 1:7400", AddressProblem::BadHost("c 1".into())),
            ("https://c1:7400/v1", AddressProblem::Trailing("/v1".into())),
            (
                "https://u@c1:7400",
                AddressProblem::Trailing("@c1:7400".into()),
            ),
            ("https://[zz]:7400", AddressProblem::BadHost("[zz]".into())),
            ("https://[::1]x", AddressProblem::Trailing("x".into())),
        ] {
            assert_eq!(CoordinatorAddress::parse(text), Err(problem), "{text}");
        }
    }

    #[test]
    fn the_same_server_is_found_whatever_the_spelling() {
        let a = CoordinatorAddress::parse("https://C1.example:443").unwrap();
        let b = CoordinatorAddress::parse("https://c1.example").unwrap();
        let c = CoordinatorAddress::parse("http://c1.example:443").unwrap();
        let d = CoordinatorAddress::parse("https://c1.example:7400").unwrap();
        assert!(a.same_server(&b));
        assert!(a.same_server(&c));
        assert!(!a.same_server(&d));
    }

    #[test]
    fn one_address_backs_off_as_before() {
        let mut search = search("https://c1:7400");
        let waits: Vec<Duration> = (0..7).map(|_| search.failed(None).wait).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            waits,
            [
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(5000),
                ms(5000)
            ]
        );
        assert_eq!(search.current().as_str(), "https://c1:7400");
        search.succeeded();
        assert_eq!(search.failed(None).wait, MS_200);
    }

    #[test]
    fn the_list_is_tried_in_order_and_backs_off_only_after_a_round() {
        let mut search = search("https://c1:7400,https://c2:7400,https://c3:7400");
        assert_eq!(search.current().as_str(), "https://c1:7400");
        let step = search.failed(None);
        assert_eq!((step.wait, step.round_ended), (Duration::ZERO, false));
        assert_eq!(search.current().as_str(), "https://c2:7400");
        search.failed(None);
        assert_eq!(search.current().as_str(), "https://c3:7400");
        let step = search.failed(None);
        assert_eq!((step.wait, step.round_ended), (MS_200, true));
        assert_eq!(search.current().as_str(), "https://c1:7400");
        search.failed(None);
        search.failed(None);
        assert_eq!(search.failed(None).wait, MS_200 * 2);
    }

    #[test]
    fn a_hint_is_followed_at_once_and_the_leader_kept() {
        let mut search = search("https://c1:7400,https://c2:7400,https://c3:7400");
        let step = search.failed(Some("https://c3:7400"));
        assert_eq!(
            step,
            Step {
                wait: Duration::ZERO,
                followed_hint: true,
                round_ended: false
            }
        );
        assert_eq!(search.current().as_str(), "https://c3:7400");
        search.succeeded();
        assert_eq!(search.current().as_str(), "https://c3:7400");
        // The leader went away: the list goes on where it was (c2), and a
        // follower there names the new leader, which is not listed.
        let step = search.failed(None);
        assert!(!step.round_ended);
        assert_eq!(search.current().as_str(), "https://c2:7400");
        search.failed(Some("https://10.0.0.9:7400"));
        assert_eq!(search.current().as_str(), "https://10.0.0.9:7400");
    }

    #[test]
    fn hints_in_a_circle_end_in_the_backoff() {
        let mut search = search("https://c1:7400,https://c2:7400");
        // c1 names c2, c2 names c1: c1 was tried in this round.
        assert!(search.failed(Some("https://c2:7400")).followed_hint);
        let step = search.failed(Some("https://c1:7400"));
        assert!(!step.followed_hint);
        assert_eq!((step.wait, step.round_ended), (MS_200, true));
        // The next round follows the circle once more, then waits longer.
        assert_eq!(search.current().as_str(), "https://c1:7400");
        assert!(search.failed(Some("https://c2:7400")).followed_hint);
        let step = search.failed(Some("https://c1:7400"));
        assert_eq!((step.wait, step.round_ended), (MS_200 * 2, true));
    }

    #[test]
    fn a_hint_to_itself_or_unparsable_is_not_followed() {
        let mut search = search("https://c1:7400");
        let step = search.failed(Some("https://c1:7400"));
        assert!(!step.followed_hint);
        assert_eq!(step.wait, MS_200);
        let step = search.failed(Some("not an address at all"));
        assert!(!step.followed_hint);
        assert_eq!(step.wait, MS_200 * 2);
    }

    #[test]
    fn ever_new_hints_are_followed_a_bounded_number_of_times_per_round() {
        let mut search = search("https://c1:7400");
        let mut prompt = 0;
        for index in 0..100 {
            let step = search.failed(Some(&format!("https://h{index}:7400")));
            if step.wait.is_zero() {
                prompt += 1;
            } else {
                break;
            }
        }
        assert_eq!(prompt, MAX_HINTS_PER_ROUND);
    }

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z][a-z0-9-]{0,20}(\\.[a-z][a-z0-9-]{0,10}){0,3}",
            any::<[u8; 4]>().prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])),
            any::<u128>().prop_map(|bits| format!("[{}]", std::net::Ipv6Addr::from(bits))),
        ]
    }

    fn address() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just(""), Just("https://"), Just("http://")],
            host(),
            proptest::option::of(1u16..),
        )
            .prop_map(|(scheme, host, port)| match port {
                Some(port) => format!("{scheme}{host}:{port}"),
                None => format!("{scheme}{host}"),
            })
    }

    proptest! {
        #[test]
        fn a_list_of_valid_addresses_parses_and_prints_back(
            addresses in proptest::collection::vec(address(), 1..6)
        ) {
            let text = addresses.join(",");
            let parsed = CoordinatorAddresses::parse(&text).expect("valid addresses");
            prop_assert_eq!(parsed.len(), addresses.len());
            let printed = parsed.to_string();
            prop_assert_eq!(CoordinatorAddresses::parse(&printed).expect("printed back"), parsed);
        }

        #[test]
        fn any_text_parses_or_is_refused_naming_an_element(text in ".{0,60}") {
            match CoordinatorAddresses::parse(&text) {
                Ok(parsed) => prop_assert_eq!(parsed.len(), text.split(',').count()),
                Err(err) => {
                    prop_assert!(err.position >= 1 && err.position <= text.split(',').count());
                    prop_assert!(!err.to_string().is_empty());
                }
            }
        }

        #[test]
        fn a_search_never_dials_without_pause_for_long(
            hints in proptest::collection::vec(proptest::option::of(address()), 1..200),
            count in 1usize..5,
        ) {
            let text: Vec<String> = (0..count).map(|i| format!("https://c{i}:7400")).collect();
            let mut search = search(&text.join(","));
            let mut prompt_in_a_row = 0;
            for hint in &hints {
                let step = search.failed(hint.as_deref());
                if step.wait.is_zero() {
                    prompt_in_a_row += 1;
                    prop_assert!(prompt_in_a_row < count + MAX_HINTS_PER_ROUND);
                } else {
                    prompt_in_a_row = 0;
                }
            }
        }
    }
}
