//! Firebase mode, assembled at start: reads the service account (or takes the emulator), and
//! builds the token verifier and the admin API client the user directory syncs with.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::firebase::FirebaseVerifier;
use crate::config::FirebaseConfig;
use crate::directory::admin::{AdminApi, AdminError};
use crate::directory::credentials::{CredentialsError, ServiceAccount};

/// Time limit of one request to Google (keys, OAuth, admin API) or the emulator.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("cannot set up the HTTP client for Firebase: {0}")]
    Http(String),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("Firebase mode needs FIREBASE_ADMIN_CREDENTIALS_JSON (or FIREBASE_AUTH_EMULATOR_HOST)")]
    NoCredentials,
}

/// What Firebase mode runs on.
pub struct Firebase {
    pub verifier: FirebaseVerifier,
    pub admin: Arc<AdminApi>,
}

impl Firebase {
    pub fn setup(config: &FirebaseConfig) -> Result<Firebase, SetupError> {
        let account = config.credentials.as_deref().map(ServiceAccount::load).transpose()?;
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .user_agent(concat!("privora/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SetupError::Http(e.to_string()))?;
        let admin = match (&config.emulator_host, account) {
            (Some(host), account) => {
                // The credentials' project wins, as in the Admin SDKs; config ensured one exists.
                let project =
                    account.map(|a| a.project_id).or_else(|| config.project_id.clone()).unwrap_or_default();
                tracing::warn!(
                    %host, %project,
                    "FIREBASE_AUTH_EMULATOR_HOST is set: EMULATOR MODE, unsigned tokens are accepted. Never use this in production."
                );
                AdminApi::emulator(host, project, http.clone())
            }
            (None, Some(account)) => AdminApi::production(account, http.clone())?,
            (None, None) => return Err(SetupError::NoCredentials),
        };
        let admin = Arc::new(admin);
        let verifier = FirebaseVerifier::new(
            admin.project_id().to_string(),
            config.certs_url.clone(),
            http,
            config.emulator_host.is_some(),
            config.check_revoked.then(|| admin.clone()),
        );
        tracing::info!(
            project = admin.project_id(),
            check_revoked = config.check_revoked,
            directory_sync_seconds = config.directory_sync.map(|d| d.as_secs()),
            "Firebase mode"
        );
        Ok(Firebase { verifier, admin })
    }
}
