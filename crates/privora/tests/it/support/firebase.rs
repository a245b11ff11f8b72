//! Firebase test helpers: RSA signing keys with self-signed x509 certificates, a local HTTP
//! endpoint that publishes them as Google does (JSON by key id, with Cache-Control) and counts
//! its fetches, token signing, and control of the real Firebase Auth Emulator that
//! scripts/test starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header::CACHE_CONTROL;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use privora::config::FirebaseConfig;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::{json, Value};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::EncodePem;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;

/// The project the verifier tests sign for.
pub const TEST_PROJECT: &str = "privora-test";
/// The project the emulator runs (a `demo-` project never reaches Google).
pub const EMULATOR_PROJECT: &str = "demo-privora";
/// The variable scripts/test sets to the emulator's host:port.
pub const EMULATOR_ENV: &str = "PRIVORA_TEST_AUTH_EMULATOR";

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

/// An RSA key as Google's would be: a key id, the private half, a self-signed certificate.
pub struct SigningKey {
    pub kid: String,
    encoding: EncodingKey,
    pub cert_pem: String,
    /// The public key as PEM (what an algorithm-confusion attacker would use as HMAC secret).
    pub public_pem: String,
    /// The private key as PKCS #8 PEM, as a service-account JSON holds it.
    pub private_pem: String,
}

impl SigningKey {
    fn generate(kid: &str) -> SigningKey {
        let mut rng = rsa::rand_core::OsRng;
        let private = RsaPrivateKey::new(&mut rng, 2048).expect("RSA key generation");
        let public = RsaPublicKey::from(&private);
        let spki = SubjectPublicKeyInfoOwned::from_key(public.clone()).expect("SPKI of the key");
        let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(private.clone());
        let name = Name::from_str("CN=securetoken.system.gserviceaccount.com").expect("name");
        let builder = CertificateBuilder::new(
            Profile::Root,
            SerialNumber::from(7u32),
            Validity::from_now(Duration::from_secs(86_400)).expect("validity"),
            name,
            spki,
            &signer,
        )
        .expect("certificate builder");
        let cert = builder.build::<rsa::pkcs1v15::Signature>().expect("certificate");
        let cert_pem = cert.to_pem(x509_cert::der::pem::LineEnding::LF).expect("certificate PEM");
        let der = private.to_pkcs1_der().expect("PKCS#1 DER");
        let public_pem = public.to_public_key_pem(rsa::pkcs8::LineEnding::LF).expect("public PEM");
        let private_pem = private.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).expect("private PEM").to_string();
        SigningKey {
            kid: kid.into(),
            encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            cert_pem,
            public_pem,
            private_pem,
        }
    }

    /// Signs `claims` with RS256 under this key's id.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("RS256 signing")
    }

    /// Signs with this key but names another key id.
    pub fn sign_as_kid(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("RS256 signing")
    }
}

/// Three keys shared by every test of the binary (generating RSA keys is slow): `keys()[0]`
/// and `[1]` are published as the tests need, `[2]` never is.
pub fn keys() -> &'static [SigningKey; 3] {
    static KEYS: OnceLock<[SigningKey; 3]> = OnceLock::new();
    KEYS.get_or_init(|| {
        [SigningKey::generate("key-a"), SigningKey::generate("key-b"), SigningKey::generate("key-c")]
    })
}

/// Claims of a valid Firebase ID token for `uid` in `project`, issued now, valid for an hour.
pub fn claims(project: &str, uid: &str) -> Value {
    let now = now();
    json!({
        "iss": format!("https://securetoken.google.com/{project}"),
        "aud": project,
        "sub": uid,
        "user_id": uid,
        "auth_time": now,
        "iat": now,
        "exp": now + 3600,
        "email": format!("{uid}@example.com"),
        "name": format!("User {uid}"),
    })
}

/// A token with an arbitrary header and no signature check in mind (`alg: none`, `HS256`...).
pub fn token_with_header(header: &Value, claims: &Value, signature: &[u8]) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.{}", part(header), part(claims), URL_SAFE_NO_PAD.encode(signature))
}

/// HS256 signed with the public key as the HMAC secret: the algorithm-confusion attack.
pub fn hs256_with_public_key(key: &SigningKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(key.public_pem.as_bytes()))
        .expect("HS256 signing")
}

/// A service-account JSON for `TEST_PROJECT` in `dir`, signed by `key`, whose OAuth endpoint
/// is `token_uri`; returns its path.
pub fn service_account(dir: &std::path::Path, key: &SigningKey, token_uri: &str) -> std::path::PathBuf {
    let path = dir.join("service-account.json");
    let json = json!({
        "type": "service_account",
        "project_id": TEST_PROJECT,
        "private_key_id": key.kid,
        "private_key": key.private_pem,
        "client_email": format!("firebase-adminsdk@{TEST_PROJECT}.iam.gserviceaccount.com"),
        "client_id": "1",
        "token_uri": token_uri,
    });
    std::fs::write(&path, json.to_string()).expect("write service account");
    path
}

/// A local stand-in for Google's certificate endpoint: the published certificates as JSON by
/// key id, with `Cache-Control: public, max-age=N`, counting its fetches.
pub struct CertServer {
    pub addr: SocketAddr,
    state: Arc<CertState>,
    task: tokio::task::JoinHandle<()>,
}

struct CertState {
    certs: Mutex<BTreeMap<String, String>>,
    fetches: AtomicU64,
    max_age: u64,
}

impl CertServer {
    pub async fn start(max_age: u64) -> CertServer {
        let state =
            Arc::new(CertState { certs: Mutex::new(BTreeMap::new()), fetches: AtomicU64::new(0), max_age });
        let app = Router::new().route("/certs", get(serve_certs)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind cert server");
        let addr = listener.local_addr().expect("cert server address");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CertServer { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/certs", self.addr)
    }

    pub fn publish(&self, key: &SigningKey) {
        self.state.certs.lock().expect("certs").insert(key.kid.clone(), key.cert_pem.clone());
    }

    pub fn fetches(&self) -> u64 {
        self.state.fetches.load(Ordering::SeqCst)
    }

    /// Firebase mode against these certificates for `TEST_PROJECT`, without any admin API.
    pub fn verifier(&self) -> privora::auth::firebase::FirebaseVerifier {
        privora::auth::firebase::FirebaseVerifier::new(
            TEST_PROJECT.into(),
            self.url(),
            reqwest::Client::new(),
            false,
            None,
        )
    }
}

impl Drop for CertServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_certs(State(state): State<Arc<CertState>>) -> impl IntoResponse {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    let certs = state.certs.lock().expect("certs").clone();
    (
        [(CACHE_CONTROL, format!("public, max-age={}, must-revalidate, no-transform", state.max_age))],
        Json(certs),
    )
}

/// The Firebase Auth Emulator that scripts/test started (host:port in `PRIVORA_TEST_AUTH_EMULATOR`).
pub struct Emulator {
    pub host: String,
    http: reqwest::Client,
}

/// A user created in the emulator, with a fresh ID token.
#[derive(Debug, Clone)]
pub struct EmulatorUser {
    pub uid: String,
    pub email: String,
    pub name: String,
    pub id_token: String,
}

impl Emulator {
    /// The running emulator; fails the test (never skips it) when there is none.
    pub async fn get() -> Emulator {
        let host = std::env::var(EMULATOR_ENV).unwrap_or_default();
        if host.is_empty() {
            panic!(
                "{EMULATOR_ENV} is not set: the Firebase tests need the Auth Emulator. Run scripts/test, \
                 which installs firebase-tools and starts the emulator"
            );
        }
        let emulator = Emulator { host, http: reqwest::Client::new() };
        let alive = emulator.http.get(format!("http://{}/", emulator.host)).send().await;
        if !alive.is_ok_and(|r| r.status().is_success()) {
            panic!(
                "the Firebase Auth Emulator at {} does not answer; run scripts/test, which starts it",
                emulator.host
            );
        }
        emulator
    }

    /// Firebase mode against this emulator, syncing the directory every `sync` seconds.
    pub fn config(&self, sync: u64, check_revoked: bool) -> FirebaseConfig {
        FirebaseConfig {
            credentials: None,
            emulator_host: Some(self.host.clone()),
            project_id: Some(EMULATOR_PROJECT.into()),
            // Unsigned emulator tokens never need Google's keys; nothing may reach out.
            certs_url: "http://127.0.0.1:9/unused".into(),
            check_revoked,
            directory_sync: (sync > 0).then(|| Duration::from_secs(sync)),
        }
    }

    fn api(&self, path: &str) -> String {
        format!("http://{}/identitytoolkit.googleapis.com/v1/{path}", self.host)
    }

    /// Creates an email/password user with a display name (unique per call) and signs it in.
    pub async fn create_user(&self, name: &str) -> EmulatorUser {
        let email = format!("{}-{}@example.com", name.to_lowercase().replace(' ', "."), unique());
        let body = json!({"email": email, "password": "secret-password", "displayName": name, "returnSecureToken": true});
        let answer: Value = self.post("accounts:signUp?key=fake-api-key", &body, false).await;
        EmulatorUser {
            uid: answer["localId"].as_str().expect("localId").into(),
            email,
            name: name.into(),
            id_token: answer["idToken"].as_str().expect("idToken").into(),
        }
    }

    /// Disables the account, as an admin would in the console.
    pub async fn disable(&self, uid: &str) {
        let body = json!({"localId": uid, "disableUser": true});
        let _: Value = self.post(&format!("projects/{EMULATOR_PROJECT}/accounts:update"), &body, true).await;
    }

    async fn post(&self, path: &str, body: &Value, admin: bool) -> Value {
        let mut request = self.http.post(self.api(path)).json(body);
        if admin {
            request = request.bearer_auth("owner");
        }
        let response = request.send().await.expect("emulator request");
        let status = response.status();
        let answer: Value = response.json().await.expect("emulator answers JSON");
        assert!(status.is_success(), "emulator {path} answered {status}: {answer}");
        answer
    }
}

/// A short suffix that makes names unique across the tests of one emulator run.
pub fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

impl super::TestServer {
    /// Polls `/readyz` (bounded by the patience) until `ready` holds for its body, which must
    /// be 200 all along; returns that body. For background work such as the directory sync.
    pub async fn wait_for_readyz(&self, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + super::PATIENCE;
        loop {
            let (status, body) = self.get("/readyz", None).await;
            assert_eq!(status, 200, "/readyz: {body}");
            if ready(&body) {
                return body;
            }
            assert!(tokio::time::Instant::now() < deadline, "/readyz never got there: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl super::TestServer {
    /// Connects and logs in with this ID token, reading the login burst.
    pub async fn login_with_token(&self, token: &str) -> (super::Client, super::Burst) {
        let mut client = self.connect().await;
        client.send_json(json!({"type": "login", "token": token})).await;
        let burst = client.login_burst().await;
        (client, burst)
    }

    /// Waits until `more` directory syncs have completed after this call began (two guarantee
    /// that one started after it).
    pub async fn wait_for_syncs(&self, more: u64) {
        let directory = self.server().state().directory.clone().expect("a server in Firebase mode");
        let target = directory.completed_syncs() + more;
        self.wait_for_readyz(|_| directory.completed_syncs() >= target).await;
    }
}
