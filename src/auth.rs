//! Access tokens: who may join which room, under which name, with which rights.
//!
//! A token is a JWT signed with HS256 by one of the server's API keys (`--api-key KID:SECRET`;
//! the token's header names the key in `kid`). The application's backend mints one per user and
//! room (`switchboard token`, or any JWT library), and the client presents it in `join`. With no
//! keys configured the server runs in development mode: anyone may join any room with every
//! right but `room_admin`.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::types::unix_time;

/// Clock skew allowed on `exp`, in seconds.
const LEEWAY_SECS: u64 = 30;

fn yes() -> bool {
    true
}

/// What a token says. Everything but `room`, `sub` and `exp` is optional; the rights default
/// to allowed, `room_admin` to not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The room the token admits to.
    pub room: String,
    /// Who the participant is in the application (its user id).
    pub sub: String,
    /// The display name the others see; absent: the name given in `join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Expiry, in seconds since the Unix epoch. Required: a token that never expires cannot be
    /// taken back.
    pub exp: u64,
    /// May publish audio and video.
    #[serde(default = "yes")]
    pub can_publish: bool,
    /// May receive the others' audio and video.
    #[serde(default = "yes")]
    pub can_subscribe: bool,
    /// May send chat (data-channel) messages.
    #[serde(default = "yes")]
    pub can_publish_data: bool,
    /// May manage the room through the admin API.
    #[serde(default)]
    pub room_admin: bool,
}

impl Claims {
    /// A token for `sub` in `room` with every right but `room_admin`, valid for `ttl`.
    pub fn new(room: &str, sub: &str, ttl: Duration) -> Self {
        Claims {
            room: room.to_owned(),
            sub: sub.to_owned(),
            name: None,
            exp: unix_time().as_secs() + ttl.as_secs(),
            can_publish: true,
            can_subscribe: true,
            can_publish_data: true,
            room_admin: false,
        }
    }
}

/// What a participant may do in its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grants {
    pub can_publish: bool,
    pub can_subscribe: bool,
    pub can_publish_data: bool,
}

impl Grants {
    /// Everything (development mode).
    pub const ALL: Grants = Grants {
        can_publish: true,
        can_subscribe: true,
        can_publish_data: true,
    };

    /// What both allow.
    pub fn and(self, other: Grants) -> Grants {
        Grants {
            can_publish: self.can_publish && other.can_publish,
            can_subscribe: self.can_subscribe && other.can_subscribe,
            can_publish_data: self.can_publish_data && other.can_publish_data,
        }
    }

    /// Whether this is less than everything (mesh rooms, whose media goes peer to peer,
    /// cannot enforce less).
    pub fn is_restricted(&self) -> bool {
        *self != Grants::ALL
    }
}

/// Who joins: the token's identity and rights, and the name to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The token's `sub` (None in development mode).
    pub identity: Option<String>,
    /// The token's name, if it has one.
    pub name: Option<String>,
    pub grants: Grants,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required to join (`token` in `join`)")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token names an unknown key `{0}`")]
    UnknownKey(String),
    #[error("the token names no key (`kid`) and the server has several")]
    NoKeyId,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token is for room `{0}`, not this one")]
    WrongRoom(String),
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("an API key must be KEY_ID:SECRET with a secret of at least 32 characters: `{0}`")]
    BadKeySpec(String),
}

/// The server's API keys, by key id.
#[derive(Clone, Default)]
pub struct Keys {
    secrets: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("Keys")
            .field("ids", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keys {
    /// Keys from `KEY_ID:SECRET` specifications.
    pub fn parse(specs: &[String]) -> Result<Self, AuthError> {
        let mut secrets = HashMap::new();
        // An empty entry (an unset variable in a compose file) is no key.
        for spec in specs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let Some((id, secret)) = spec.split_once(':') else {
                return Err(AuthError::BadKeySpec(redact(spec)));
            };
            if id.is_empty() || secret.len() < 32 {
                return Err(AuthError::BadKeySpec(redact(spec)));
            }
            secrets.insert(id.to_owned(), secret.as_bytes().to_vec());
        }
        Ok(Keys { secrets })
    }

    /// No keys: development mode, joins are open.
    pub fn is_dev_mode(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Key `id`, or the only key there is when `id` is None.
    fn key(&self, id: Option<&str>) -> Result<(&str, &[u8]), AuthError> {
        let found = match id {
            Some(id) => self.secrets.get_key_value(id),
            None if self.secrets.len() == 1 => self.secrets.iter().next(),
            None => return Err(AuthError::NoKeyId),
        };
        found
            .map(|(id, secret)| (id.as_str(), secret.as_slice()))
            .ok_or_else(|| AuthError::UnknownKey(id.unwrap_or_default().to_owned()))
    }

    /// Signs `claims` with key `id` (None: the only key there is).
    pub fn mint(&self, id: Option<&str>, claims: &Claims) -> Result<String, AuthError> {
        let (id, secret) = self.key(id)?;
        let header = Header {
            kid: Some(id.to_owned()),
            ..Header::new(Algorithm::HS256)
        };
        let key =
            EncodingKey::from_secret(secret).map_err(|e| AuthError::Malformed(e.to_string()))?;
        jsonwebtoken::encode(&header, claims, &key).map_err(|e| AuthError::Malformed(e.to_string()))
    }

    /// The verified claims of `token`.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        let (_, secret) = self.key(header.kid.as_deref())?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let key =
            DecodingKey::from_secret(secret).map_err(|e| AuthError::Malformed(e.to_string()))?;
        jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                _ => AuthError::Malformed(e.to_string()),
            })
    }

    /// Whether a `join` to `room` with `token` is let in, and with what.
    pub fn admit(&self, token: Option<&str>, room: &str) -> Result<Admission, AuthError> {
        if self.is_dev_mode() {
            return Ok(Admission {
                identity: None,
                name: None,
                grants: Grants::ALL,
            });
        }
        let claims = self.verify(token.ok_or(AuthError::Missing)?)?;
        if claims.room != room {
            return Err(AuthError::WrongRoom(claims.room));
        }
        Ok(Admission {
            identity: Some(claims.sub),
            name: claims.name,
            grants: Grants {
                can_publish: claims.can_publish,
                can_subscribe: claims.can_subscribe,
                can_publish_data: claims.can_publish_data,
            },
        })
    }
}

/// A key specification for an error message, without its secret.
fn redact(spec: &str) -> String {
    match spec.split_once(':') {
        Some((id, _)) => format!("{id}:…"),
        None => "…".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn keys(specs: &[&str]) -> Keys {
        Keys::parse(&specs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("keys")
    }

    #[test]
    fn a_minted_token_admits_to_its_room_only() {
        let k = keys(&[&format!("k1:{SECRET}")]);
        let mut claims = Claims::new("standup", "alice", Duration::from_secs(60));
        claims.name = Some("Alice".into());
        claims.can_publish = false;
        let token = k.mint(None, &claims).expect("mint");
        let admission = k.admit(Some(&token), "standup").expect("admitted");
        assert_eq!(admission.identity.as_deref(), Some("alice"));
        assert_eq!(admission.name.as_deref(), Some("Alice"));
        assert!(!admission.grants.can_publish && admission.grants.can_subscribe);
        assert!(admission.grants.is_restricted());
        assert_eq!(
            k.admit(Some(&token), "other"),
            Err(AuthError::WrongRoom("standup".into()))
        );
        assert_eq!(k.admit(None, "standup"), Err(AuthError::Missing));
    }

    #[test]
    fn expired_forged_and_unknown_key_tokens_are_refused() {
        let k = keys(&[&format!("k1:{SECRET}"), &format!("k2:{SECRET}-two")]);
        let mut old = Claims::new("r", "bob", Duration::ZERO);
        old.exp -= 3600;
        let expired = k.mint(Some("k1"), &old).expect("mint");
        assert_eq!(k.verify(&expired), Err(AuthError::Expired));
        let other = keys(&[&format!("k1:{SECRET}-other")]);
        let forged = other
            .mint(
                Some("k1"),
                &Claims::new("r", "eve", Duration::from_secs(60)),
            )
            .expect("mint");
        assert_eq!(k.verify(&forged), Err(AuthError::BadSignature));
        let stray = keys(&[&format!("k3:{SECRET}")])
            .mint(None, &Claims::new("r", "eve", Duration::from_secs(60)))
            .expect("mint");
        assert_eq!(k.verify(&stray), Err(AuthError::UnknownKey("k3".into())));
        assert!(matches!(
            k.verify("not.a.jwt"),
            Err(AuthError::Malformed(_))
        ));
        // Both keys verify their own tokens.
        for id in ["k1", "k2"] {
            let t = k
                .mint(
                    Some(id),
                    &Claims::new("r", "carol", Duration::from_secs(60)),
                )
                .expect("mint");
            assert!(k.verify(&t).is_ok(), "{id}");
        }
    }

    #[test]
    fn no_keys_is_development_mode_and_short_secrets_are_refused() {
        let open = Keys::default();
        assert!(open.is_dev_mode());
        assert_eq!(open.admit(None, "any").map(|a| a.grants), Ok(Grants::ALL));
        assert!(matches!(
            Keys::parse(&["k:short".to_string()]),
            Err(AuthError::BadKeySpec(s)) if s == "k:…"
        ));
        assert!(Keys::parse(&["nocolon".to_string()]).is_err());
        assert!(Keys::parse(&[String::new()]).expect("empty").is_dev_mode());
    }
}
