//! `fabricctl pki` (the fabric's CA and its certificates, made on the
//! operator's machine: no server is involved) and `fabricctl token` (bearer
//! tokens, kept by the coordinator).

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow};
use fabric_proto::v1::{CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, TokenInfo};
use fabric_trust::pki::{self, IssueOptions};
use fabric_trust::{Identity, Role};
use serde::Serialize;

use crate::output::{self, OutputFormat, Row, time_ms};
use crate::remote::{Remote, status_error};

/// `pki init`: a new CA in `dir`.
pub fn pki_init(dir: &Path, valid_for: Duration) -> anyhow::Result<()> {
    pki::init(dir, "fabric CA", valid_for)?;
    crate::outln!(
        "made a CA in {dir}: {dir}/{cert} (give it to every server and client as tls_ca) and {dir}/{key} (mode 0600: whoever reads it can mint any identity; keep it offline)",
        dir = dir.display(),
        cert = pki::CA_CERT_FILE,
        key = pki::CA_KEY_FILE
    )?;
    Ok(())
}

/// `pki issue`: a certificate for `role/name`, written into `out`.
pub fn pki_issue(
    dir: &Path,
    out: &Path,
    role: Role,
    name: &str,
    valid_for: Duration,
    dns_names: Vec<String>,
    ip_addresses: Vec<IpAddr>,
) -> anyhow::Result<()> {
    let authority = pki::load(dir).with_context(|| {
        format!(
            "cannot read the CA in {} (make one with `fabricctl pki init --dir {}`)",
            dir.display(),
            dir.display()
        )
    })?;
    let identity = Identity::new(role, name)?;
    let options = IssueOptions {
        dns_names,
        ip_addresses,
        ..IssueOptions::valid_for(valid_for)
    };
    let issued = authority.issue(&identity, &options)?;
    let (certificate, key) = pki::write_issued(out, &identity, &issued)?;
    crate::outln!(
        "issued {identity} ({} days): {} and {} (mode 0600)",
        valid_for.as_secs() / 86_400,
        certificate.display(),
        key.display()
    )?;
    Ok(())
}

#[derive(Serialize)]
struct TokenRow {
    id: String,
    role: String,
    name: String,
    created: String,
    expires: String,
    revoked: String,
    created_by: String,
}

impl Row for TokenRow {
    fn headers() -> &'static [&'static str] {
        &[
            "id",
            "role",
            "name",
            "created",
            "expires",
            "revoked",
            "created by",
        ]
    }
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.role.clone(),
            self.name.clone(),
            self.created.clone(),
            self.expires.clone(),
            self.revoked.clone(),
            self.created_by.clone(),
        ]
    }
}

fn token_row(info: &TokenInfo) -> TokenRow {
    TokenRow {
        id: info.id.clone(),
        role: info.role.clone(),
        name: info.name.clone(),
        created: time_ms(info.created_ms),
        expires: time_ms(info.expires_ms),
        revoked: if info.revoked_ms == 0 {
            String::new()
        } else {
            format!("{} by {}", time_ms(info.revoked_ms), info.revoked_by)
        },
        created_by: info.created_by.clone(),
    }
}

/// `token create`: prints the token, once.
pub async fn token_create(
    remote: &Remote,
    role: &str,
    name: &str,
    valid_for: Duration,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let made = client
        .create_token(CreateTokenRequest {
            role: role.to_owned(),
            name: name.to_owned(),
            valid_for_s: valid_for.as_secs(),
        })
        .await
        .map_err(|status| status_error("creating a token", status))?
        .into_inner();
    let info = made
        .info
        .ok_or_else(|| anyhow!("the coordinator sent no token record"))?;
    #[derive(Serialize)]
    struct Made {
        token: String,
        id: String,
        role: String,
        name: String,
        expires: String,
    }
    let row = Made {
        token: made.token,
        id: info.id.clone(),
        role: info.role.clone(),
        name: info.name.clone(),
        expires: time_ms(info.expires_ms),
    };
    output::print_one(&row, format, |row| {
        format!(
            "{}\n(token {} for {}/{}, expires {}; shown once: the coordinator keeps only its hash. Use it as FABRIC_TOKEN or `authorization: Bearer ...`; revoke it with `fabricctl token revoke {}`)\n",
            row.token, row.id, row.role, row.name, row.expires, row.id
        )
    })
}

/// `token list`.
pub async fn token_list(remote: &Remote, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let tokens = client
        .list_tokens(ListTokensRequest {})
        .await
        .map_err(|status| status_error("listing tokens", status))?
        .into_inner()
        .tokens;
    output::print_rows(&tokens.iter().map(token_row).collect::<Vec<_>>(), format)
}

/// `token revoke ID`.
pub async fn token_revoke(remote: &Remote, id: &str, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = remote.coordinator().await?;
    let info = client
        .revoke_token(RevokeTokenRequest { id: id.to_owned() })
        .await
        .map_err(|status| status_error(&format!("revoking token {id}"), status))?
        .into_inner();
    output::print_rows(&[token_row(&info)], format)
}
