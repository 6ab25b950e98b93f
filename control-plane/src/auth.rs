//! Who is calling: requests in, [`Principal`]s out.
//!
//! Handlers never look at credentials. They receive a [`Principal`] (tenant, role, actor) and
//! call [`Principal::require`]; tenant isolation follows from passing `principal.tenant` to the
//! store's tenant-scoped accessors. How a principal was established is the business of an
//! [`Authenticator`]; an [`AuthChain`] tries several in order. Today there is one, bearer API
//! tokens ([`ApiTokenAuthenticator`]); browser logins (local users with scrypt + TOTP, a session
//! cookie and CSRF) become a second authenticator in the chain without touching any handler.
//!
//! Chain rule: the first authenticator that recognises the request decides. `Ok(None)` means
//! "not mine" (no such header/cookie) and the next one is asked; `Err` stops the chain (a
//! presented credential that is wrong must fail, not fall through to a weaker method).

use std::sync::Arc;

use hyper::http::request::Parts;

use crate::secrets;
use crate::store::{Role, Store, TenantId};

/// How a principal authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrincipalKind {
    /// A bearer API token.
    ApiToken { token_id: String },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: TenantId,
    pub role: Role,
    /// Recorded as the actor of events: `token:<id>` (later `user:<name>`).
    pub actor_id: String,
    pub kind: PrincipalKind,
}

impl Principal {
    /// `Ok` if this principal's role is at least `min`, else [`AuthError::Forbidden`].
    pub fn require(&self, min: Role) -> Result<(), AuthError> {
        if self.role >= min {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                needed: min,
                have: self.role,
            })
        }
    }

    /// Owners of the default tenant administer the installation (other tenants, global metrics).
    pub fn is_installation_owner(&self) -> bool {
        self.role == Role::Owner && self.tenant.as_str() == TenantId::DEFAULT
    }
}

/// Why a request is not allowed. Each variant maps to one HTTP status and error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "this route needs an API token: send `Authorization: Bearer cmt_...` (mint one with \
         `codemantle-control-plane token create` or `codemantle tokens create`)"
    )]
    Missing,
    #[error("{0}")]
    Invalid(String),
    #[error("this token was revoked; ask an admin for a new one")]
    Revoked,
    #[error("this needs role {needed} or higher; your token has role {have}")]
    Forbidden { needed: Role, have: Role },
    #[error("cannot check credentials right now ({0}); retry shortly")]
    Unavailable(String),
}

impl AuthError {
    pub fn status(&self) -> u16 {
        match self {
            AuthError::Missing | AuthError::Invalid(_) | AuthError::Revoked => 401,
            AuthError::Forbidden { .. } => 403,
            AuthError::Unavailable(_) => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "auth_required",
            AuthError::Invalid(_) => "invalid_token",
            AuthError::Revoked => "token_revoked",
            AuthError::Forbidden { .. } => "forbidden",
            AuthError::Unavailable(_) => "auth_unavailable",
        }
    }
}

/// One way of establishing a principal from a request head. Must be fast: it runs on every
/// request (implementations that need slow work should cache).
pub trait Authenticator: Send + Sync + 'static {
    /// `Ok(None)`: this request carries no credential of this kind.
    fn authenticate(&self, request: &Parts) -> Result<Option<Principal>, AuthError>;
}

/// Authenticators tried in order (see the module docs for the rule).
#[derive(Default)]
pub struct AuthChain {
    authenticators: Vec<Box<dyn Authenticator>>,
}

impl AuthChain {
    pub fn new() -> Self {
        Self::default()
    }

    /// The chain every server uses today: bearer API tokens.
    pub fn standard(store: Arc<dyn Store>) -> Self {
        Self::new().with(ApiTokenAuthenticator::new(store))
    }

    /// Appends an authenticator.
    pub fn with(mut self, authenticator: impl Authenticator) -> Self {
        self.authenticators.push(Box::new(authenticator));
        self
    }

    /// The principal of `request`, or why there is none.
    pub fn authenticate(&self, request: &Parts) -> Result<Principal, AuthError> {
        for a in &self.authenticators {
            if let Some(p) = a.authenticate(request)? {
                return Ok(p);
            }
        }
        Err(AuthError::Missing)
    }
}

/// `Authorization: Bearer cmt_<id>_<secret>`: looks the token up by id and compares
/// SHA-256(secret) in constant time.
pub struct ApiTokenAuthenticator {
    store: Arc<dyn Store>,
}

impl ApiTokenAuthenticator {
    pub fn new(store: Arc<dyn Store>) -> Self {
        ApiTokenAuthenticator { store }
    }

    /// Checks a bearer string; used by the header path and by tests.
    pub fn verify(&self, bearer: &str) -> Result<Principal, AuthError> {
        let malformed = || {
            AuthError::Invalid(
                "the bearer token is malformed: expected `cmt_<16 hex id>_<secret>` as printed \
                 when it was created"
                    .into(),
            )
        };
        let (id, secret) = secrets::split_api_token(bearer).ok_or_else(malformed)?;
        let unknown = || {
            AuthError::Invalid(
                "unknown or wrong API token; check CODEMANTLE_TOKEN / --token".into(),
            )
        };
        let token = self
            .store
            .api_token(id)
            .map_err(|e| AuthError::Unavailable(e.to_string()))?
            .ok_or_else(unknown)?;
        if !secrets::constant_time_eq(&secrets::sha256(secret.as_bytes()), &token.secret_sha256) {
            return Err(unknown());
        }
        // Revocation is reported only to someone who holds the secret.
        if token.revoked {
            return Err(AuthError::Revoked);
        }
        Ok(Principal {
            tenant: token.tenant,
            role: token.role,
            actor_id: format!("token:{}", token.id),
            kind: PrincipalKind::ApiToken { token_id: token.id },
        })
    }
}

impl Authenticator for ApiTokenAuthenticator {
    fn authenticate(&self, request: &Parts) -> Result<Option<Principal>, AuthError> {
        let Some(value) = request.headers.get(hyper::header::AUTHORIZATION) else {
            return Ok(None);
        };
        let value = value.to_str().map_err(|_| {
            AuthError::Invalid("the Authorization header is not valid ASCII".into())
        })?;
        let Some((scheme, credential)) = value.trim().split_once(' ') else {
            return Err(AuthError::Invalid(
                "the Authorization header must be `Bearer <token>`".into(),
            ));
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            // Another scheme (e.g. Basic for a future authenticator): not ours.
            return Ok(None);
        }
        self.verify(credential.trim()).map(Some)
    }
}
