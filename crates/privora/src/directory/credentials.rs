//! The Firebase service account (`FIREBASE_ADMIN_CREDENTIALS_JSON`): read and checked once at
//! start, so that a wrong file stops the server with a message that says which file and why.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The fields of a service-account JSON that Privora uses.
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    /// PKCS #8 PEM; signs the OAuth grant. Never logged.
    pub private_key: String,
    #[serde(default)]
    pub private_key_id: Option<String>,
    #[serde(default = "default_token_uri")]
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "FIREBASE_ADMIN_CREDENTIALS_JSON names {0}, which does not exist; download the service-account \
         key (Firebase console > Project settings > Service accounts > Generate new private key)"
    )]
    Missing(PathBuf),
    #[error("cannot read FIREBASE_ADMIN_CREDENTIALS_JSON {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("FIREBASE_ADMIN_CREDENTIALS_JSON {path} is not JSON: {reason}")]
    NotJson { path: PathBuf, reason: String },
    #[error(
        "FIREBASE_ADMIN_CREDENTIALS_JSON {path} is not a service-account key (its \"type\" is {found:?}, \
         expected \"service_account\"); use the key from Project settings > Service accounts, not the web \
         app config"
    )]
    NotServiceAccount { path: PathBuf, found: String },
    #[error("FIREBASE_ADMIN_CREDENTIALS_JSON {path} is a service account but lacks {field}: {reason}")]
    Incomplete { path: PathBuf, field: &'static str, reason: String },
}

impl ServiceAccount {
    pub fn load(path: &Path) -> Result<ServiceAccount, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => CredentialsError::Missing(path.to_path_buf()),
            _ => CredentialsError::Unreadable { path: path.to_path_buf(), source },
        })?;
        ServiceAccount::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<ServiceAccount, CredentialsError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| CredentialsError::NotJson { path: path.to_path_buf(), reason: e.to_string() })?;
        let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
        if kind != "service_account" {
            return Err(CredentialsError::NotServiceAccount {
                path: path.to_path_buf(),
                found: kind.to_string(),
            });
        }
        let account: ServiceAccount =
            serde_json::from_value(value).map_err(|e| CredentialsError::Incomplete {
                path: path.to_path_buf(),
                field: "a required field (project_id, client_email, private_key)",
                reason: e.to_string(),
            })?;
        let incomplete = |field, reason: &str| CredentialsError::Incomplete {
            path: path.to_path_buf(),
            field,
            reason: reason.to_string(),
        };
        if account.project_id.trim().is_empty() {
            return Err(incomplete("project_id", "it is empty"));
        }
        if account.client_email.trim().is_empty() {
            return Err(incomplete("client_email", "it is empty"));
        }
        if let Err(e) = jsonwebtoken::EncodingKey::from_rsa_pem(account.private_key.as_bytes()) {
            return Err(incomplete("private_key", &format!("not an RSA private key in PEM ({e})")));
        }
        Ok(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_which_and_where() {
        let path = Path::new("/nowhere/sa.json");
        assert!(matches!(ServiceAccount::load(path), Err(CredentialsError::Missing(_))));
        let web_config = r#"{"apiKey":"x","projectId":"p"}"#;
        let error = ServiceAccount::parse(web_config, path).unwrap_err();
        assert!(
            error.to_string().contains("/nowhere/sa.json") && error.to_string().contains("service-account")
        );
        let no_key =
            r#"{"type":"service_account","project_id":"p","client_email":"a@b","private_key":"nope"}"#;
        assert!(matches!(
            ServiceAccount::parse(no_key, path),
            Err(CredentialsError::Incomplete { field: "private_key", .. })
        ));
        assert!(matches!(ServiceAccount::parse("{", path), Err(CredentialsError::NotJson { .. })));
    }
}
