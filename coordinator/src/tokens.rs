//! Bearer tokens: made, listed and revoked by operators, checked on every
//! call that carries one. The coordinator keeps only a hash of each secret
//! ([`fabric_trust::token`]); a revoked or expired token is refused on its
//! next call, since every call reads the stored record (no cache to wait
//! out, no restart).
//!
//! Tokens are for services that cannot hold a client certificate: roles
//! operator, monitor and client. Nodes prove their id with certificates
//! only, and a token never makes a coordinator.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use fabric_proto::v1::{CreateTokenRequest, CreateTokenResponse, TokenInfo};
use fabric_trust::token::Token;
use fabric_trust::{Identity, Role, TokenVerifier};

use crate::engine::{EngineError, now_ms};
use crate::record::StoredToken;
use crate::state::Store;

/// A token's lifetime when the request gives none.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// The longest lifetime a token may have.
pub const MAX_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// The token store.
#[derive(Clone, Debug)]
pub struct Tokens {
    store: Store,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Tokens {
    /// Tokens kept in `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Make a token; `by` is who asked (`operator/alice`).
    pub async fn create(
        &self,
        request: &CreateTokenRequest,
        by: &str,
    ) -> Result<CreateTokenResponse, EngineError> {
        let role: Role = request
            .role
            .parse()
            .map_err(|err: fabric_trust::IdentityError| {
                EngineError::InvalidArgument(err.to_string())
            })?;
        if !matches!(role, Role::Operator | Role::Monitor | Role::Client) {
            return Err(EngineError::InvalidArgument(format!(
                "a token cannot have role {role}: tokens are for operator, monitor and client; nodes and coordinators use certificates"
            )));
        }
        let identity = Identity::new(role, &request.name)
            .map_err(|err| EngineError::InvalidArgument(format!("token name: {err}")))?;
        let valid_for = if request.valid_for_s == 0 {
            DEFAULT_VALIDITY
        } else {
            Duration::from_secs(request.valid_for_s)
        };
        if valid_for > MAX_VALIDITY {
            return Err(EngineError::InvalidArgument(format!(
                "a token may live at most {} days, not {} s",
                MAX_VALIDITY.as_secs() / 86_400,
                request.valid_for_s
            )));
        }
        let token = Token::generate();
        let now = now_ms();
        let info = TokenInfo {
            id: token.id.clone(),
            role: identity.role.to_string(),
            name: identity.name.clone(),
            created_ms: now,
            expires_ms: now.saturating_add(millis(valid_for)),
            revoked_ms: 0,
            created_by: by.to_owned(),
            revoked_by: String::new(),
        };
        self.store.put_token(&StoredToken {
            info: Some(info.clone()),
            secret_hash: token.secret_hash().to_vec(),
        })?;
        self.store.flush().await?;
        tracing::info!(token = %info.id, role = %info.role, name = %info.name, by, "token created");
        Ok(CreateTokenResponse {
            token: token.reveal(),
            info: Some(info),
        })
    }

    /// Every token, newest first, without secrets.
    pub fn list(&self) -> Result<Vec<TokenInfo>, EngineError> {
        let mut tokens: Vec<TokenInfo> = self
            .store
            .tokens()?
            .into_iter()
            .filter_map(|token| token.info)
            .collect();
        tokens.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
        Ok(tokens)
    }

    /// Revoke token `id`; its next call is refused.
    pub async fn revoke(&self, id: &str, by: &str) -> Result<TokenInfo, EngineError> {
        let not_found = || {
            EngineError::NotFound(format!(
                "no token with id {:?} (see fabricctl token list)",
                id.chars().take(32).collect::<String>()
            ))
        };
        let mut stored = self.store.token(id)?.ok_or_else(not_found)?;
        let info = stored.info.as_mut().ok_or_else(not_found)?;
        if info.revoked_ms == 0 {
            info.revoked_ms = now_ms();
            info.revoked_by = by.to_owned();
            tracing::info!(token = %info.id, by, "token revoked");
        }
        let info = info.clone();
        self.store.put_token(&stored)?;
        self.store.flush().await?;
        Ok(info)
    }

    /// The identity of a presented token, or why not (never naming the
    /// secret).
    pub fn check(&self, presented: &str) -> Result<Identity, String> {
        let refused = "unknown, expired or revoked token";
        let token = Token::parse(presented).map_err(|err| err.to_string())?;
        let stored = self
            .store
            .token(&token.id)
            .map_err(|err| {
                tracing::error!(error = %err, "reading a token failed");
                "the token store cannot be read".to_owned()
            })?
            .ok_or_else(|| refused.to_owned())?;
        let info = stored.info.as_ref().ok_or_else(|| refused.to_owned())?;
        if !token.matches(&stored.secret_hash) {
            return Err(refused.to_owned());
        }
        if info.revoked_ms != 0 {
            return Err(format!("token {} was revoked", info.id));
        }
        if info.expires_ms <= now_ms() {
            return Err(format!("token {} has expired", info.id));
        }
        let role: Role = info.role.parse().map_err(|_| refused.to_owned())?;
        Identity::new(role, &info.name).map_err(|_| refused.to_owned())
    }
}

impl TokenVerifier for Tokens {
    fn verify(
        &self,
        token: String,
    ) -> Pin<Box<dyn Future<Output = Result<Identity, String>> + Send>> {
        let tokens = self.clone();
        // A sled read: brief, but off the async threads all the same.
        Box::pin(async move {
            tokio::task::spawn_blocking(move || tokens.check(&token))
                .await
                .map_err(|_| "the token check failed".to_owned())?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(role: &str, name: &str) -> CreateTokenRequest {
        CreateTokenRequest {
            role: role.into(),
            name: name.into(),
            valid_for_s: 0,
        }
    }

    #[tokio::test]
    async fn a_token_works_until_it_is_revoked_and_only_its_hash_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(Store::open(dir.path()).unwrap());
        let made = tokens
            .create(&request("monitor", "grafana"), "operator/alice")
            .await
            .unwrap();
        let identity = tokens.check(&made.token).unwrap();
        assert_eq!(identity.to_string(), "monitor/grafana");
        let listed = tokens.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].created_by, "operator/alice");
        let secret = made.token.rsplit('_').next().unwrap().to_owned();
        for stored in tokens.store.tokens().unwrap() {
            let bytes = prost::Message::encode_to_vec(&stored);
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }

        tokens.revoke(&listed[0].id, "operator/bob").await.unwrap();
        let refused = tokens.check(&made.token).unwrap_err();
        assert!(refused.contains("revoked"), "{refused}");
        assert!(!refused.contains(&secret));
    }

    #[tokio::test]
    async fn tokens_for_nodes_and_forged_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(Store::open(dir.path()).unwrap());
        for role in ["node", "coordinator", "root"] {
            assert!(matches!(
                tokens.create(&request(role, "x"), "operator/alice").await,
                Err(EngineError::InvalidArgument(_))
            ));
        }
        let made = tokens
            .create(&request("client", "web1"), "operator/alice")
            .await
            .unwrap();
        let id = made.info.unwrap().id;
        let forged = format!("fabric_{id}_{}", "0".repeat(64));
        assert_eq!(
            tokens.check(&forged).unwrap_err(),
            "unknown, expired or revoked token"
        );
        assert!(tokens.check("not a token").is_err());
    }
}
