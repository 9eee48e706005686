//! Who a caller is: a role and a name, as a fabric certificate states them.
//!
//! A certificate issued by the fabric's CA carries its identity as one URI
//! subject alternative name, `fabric://ROLE/NAME` (the SPIFFE habit: the
//! identity is a name the CA vouches for, not a host name, so a node keeps
//! its identity when its pod moves to another address). A bearer token
//! resolves to the same pair. This module parses and formats identities; it
//! never decides what an identity may do (that is [`crate::authz`]).

use std::fmt;
use std::str::FromStr;

/// What a caller may be. Each RPC lists the roles allowed to call it in
/// [`crate::authz::TABLE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A person or tool running the fabric: everything.
    Operator,
    /// Read-only listings, check, watch, health.
    Monitor,
    /// A storage node or a client's agent; its name is its node id.
    Node,
    /// A host that backs itself up with `fabricctl backup`: put-only, and
    /// read-only on its own snapshots; its name is its host name.
    Client,
    /// The coordinator's own server certificate.
    Coordinator,
}

impl Role {
    /// Every role, in the order the documentation lists them.
    pub const ALL: [Role; 5] = [
        Role::Operator,
        Role::Monitor,
        Role::Node,
        Role::Client,
        Role::Coordinator,
    ];

    /// The role's name in URIs, tokens and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Monitor => "monitor",
            Role::Node => "node",
            Role::Client => "client",
            Role::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| IdentityError::UnknownRole(shorten(text)))
    }
}

/// Why an identity could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not one of the roles.
    #[error("unknown role {0:?}: expected operator, monitor, node, client or coordinator")]
    UnknownRole(String),
    /// A name outside the allowed characters or length.
    #[error(
        "bad name {0:?}: 1 to 253 characters of letters, digits, '.', '-' and '_', starting with a letter or digit"
    )]
    BadName(String),
    /// A URI that is not `fabric://ROLE/NAME`.
    #[error("bad identity URI {0:?}: expected fabric://ROLE/NAME")]
    BadUri(String),
    /// The certificate could not be parsed.
    #[error("cannot parse the certificate: {0}")]
    BadCertificate(String),
    /// The certificate names no fabric identity, or more than one.
    #[error("the certificate carries {0} fabric identities (fabric://ROLE/NAME), expected one")]
    IdentityCount(usize),
}

/// Keep a bad input's echo short: an error must never carry a whole
/// (possibly huge, possibly secret) input back to the caller.
pub(crate) fn shorten(text: &str) -> String {
    shorten_to(text, 64)
}

/// `text`'s first `max` bytes (on a character boundary) and `...` if it
/// is longer: how much of an input a message may echo.
pub fn shorten_to(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A role and a name: `node/n1`, `operator/alice`, `client/web1`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// What it may do.
    pub role: Role,
    /// Node id, host name, or a person's or service's name.
    pub name: String,
}

/// The URI scheme of fabric identities.
pub const URI_SCHEME: &str = "fabric://";

impl Identity {
    /// An identity, with its name checked.
    pub fn new(role: Role, name: &str) -> Result<Self, IdentityError> {
        validate_name(name)?;
        Ok(Self {
            role,
            name: name.to_owned(),
        })
    }

    /// `fabric://ROLE/NAME`, as a certificate carries it.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}", self.role, self.name)
    }

    /// Read `fabric://ROLE/NAME`.
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix(URI_SCHEME)
            .ok_or_else(|| IdentityError::BadUri(shorten(uri)))?;
        let (role, name) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::BadUri(shorten(uri)))?;
        Identity::new(role.parse()?, name)
    }

    /// The one fabric identity a DER certificate carries. The caller has
    /// verified the certificate's chain; this only reads it.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|err| IdentityError::BadCertificate(err.to_string()))?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|err| IdentityError::BadCertificate(err.to_string()))?;
        let uris: Vec<&str> = names
            .iter()
            .flat_map(|extension| extension.value.general_names.iter())
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .filter(|uri| uri.starts_with(URI_SCHEME))
            .collect();
        match uris.as_slice() {
            [uri] => Identity::from_uri(uri),
            other => Err(IdentityError::IdentityCount(other.len())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// A name is what node ids and host names allow (DNS-like), so it is safe in
/// a URI, a file name and a log line.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadName(shorten(name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        for role in Role::ALL {
            let identity = Identity::new(role, "web-1.example_2").unwrap();
            assert_eq!(Identity::from_uri(&identity.uri()).unwrap(), identity);
        }
    }

    #[test]
    fn bad_uris_and_names_are_refused_with_a_short_echo() {
        assert!(matches!(
            Identity::from_uri("https://node/n1"),
            Err(IdentityError::BadUri(_))
        ));
        assert!(matches!(
            Identity::from_uri("fabric://root/n1"),
            Err(IdentityError::UnknownRole(_))
        ));
        for name in ["", "../n1", "n1/x", ".hidden", "a b", "n\0"] {
            assert!(
                matches!(
                    Identity::new(Role::Node, name),
                    Err(IdentityError::BadName(_))
                ),
                "{name:?}"
            );
        }
        let long = "x".repeat(100_000);
        let message = Identity::new(Role::Node, &long).unwrap_err().to_string();
        assert!(message.len() < 300, "{message}");
    }
}
