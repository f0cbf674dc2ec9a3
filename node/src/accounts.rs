//! Accounts: creating, changing, banning and deleting users, for the admin API (`/v1/users`) and
//! for `kefu-node user …` working on a stopped node's data dir. Every change is one step of the
//! store's writer, so it replicates like any other row (last writer wins between nodes). A
//! password change, ban, delete or logout raises the user's token epoch: their tokens stop
//! working everywhere and their sessions end at every node as the change arrives there.

use schema::jim::valid_id;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{self, HashCost};
use crate::store::{Store, StoreError, UserRecord};

/// The roles a user can have. Agents and admins may recall others' messages and see more; only
/// admins may close other users' sessions.
pub const ROLES: [&str; 3] = ["user", "agent", "admin"];

/// Longest password accepted (hashing cost grows with it).
const MAX_PASSWORD: usize = 1024;
/// Longest nick or avatar URL.
const MAX_TEXT: usize = 512;

/// A user to create (`POST /v1/users`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Id (J-IM's rule: 1 to 64 characters, no `:` and no control characters).
    pub id: String,
    /// Password.
    pub password: String,
    /// Display name (default: the id).
    #[serde(default)]
    pub nick: Option<String>,
    /// Avatar URL.
    #[serde(default)]
    pub avatar: Option<String>,
    /// `user` (default), `agent` or `admin`.
    #[serde(default)]
    pub role: Option<String>,
}

/// Fields to change (`PATCH /v1/users/{id}`); absent fields stay.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// New display name.
    #[serde(default)]
    pub nick: Option<String>,
    /// New avatar URL.
    #[serde(default)]
    pub avatar: Option<String>,
    /// New role.
    #[serde(default)]
    pub role: Option<String>,
    /// New password: ends every session and token of the user.
    #[serde(default)]
    pub password: Option<String>,
}

/// Why an account change was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The id is taken.
    #[error("user {0} exists")]
    Exists(String),
    /// No such user.
    #[error("no user {0}")]
    NotFound(String),
    /// A field is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed; retry.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// Password hashing is busy (a login storm); retry.
    #[error("password hashing is busy; retry")]
    Busy,
}

/// What account changes need: the store, and how to hash new passwords.
pub struct Accounts<'a> {
    /// The store.
    pub store: &'a Store,
    /// Cost of new hashes.
    pub cost: HashCost,
    /// Where hashing runs (the node's login pool).
    pub passwords: &'a auth::PasswordPool,
}

/// Which way a user's access changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Banned: cannot log in; sessions and tokens end.
    Ban,
    /// Allowed again (old tokens stay refused).
    Unban,
    /// Sessions and tokens end; the user can log in again.
    Logout,
    /// Gone: the id can be created again.
    Delete,
}

impl Accounts<'_> {
    /// Creates a user.
    pub async fn create(&self, new: NewUser) -> Result<UserRecord, AccountError> {
        if !valid_id(&new.id) {
            return Err(AccountError::Invalid(format!("user id {:?}: 1 to 64 characters, without ':' or control characters", new.id)));
        }
        check_texts(new.nick.as_deref(), new.avatar.as_deref())?;
        let role = check_role(new.role.as_deref().unwrap_or("user"))?;
        let hash = self.hash(&new.password).await?;
        let nick = new.nick.filter(|n| !n.is_empty()).or_else(|| Some(new.id.clone()));
        let record = UserRecord::new(&new.id, hash, nick, new.avatar.filter(|a| !a.is_empty()), role);
        if !self.store.create_user(record, true).await? {
            return Err(AccountError::Exists(new.id));
        }
        self.store.user(&new.id).await?.ok_or(AccountError::NotFound(new.id))
    }

    /// Changes a user's nick, avatar, role or password.
    pub async fn patch(&self, id: &str, patch: UserPatch) -> Result<UserRecord, AccountError> {
        check_texts(patch.nick.as_deref(), patch.avatar.as_deref())?;
        let role = patch.role.as_deref().map(check_role).transpose()?.map(str::to_string);
        let hash = match &patch.password {
            Some(p) => Some(self.hash(p).await?),
            None => None,
        };
        let written = self
            .store
            .edit_user(id, move |current| {
                let mut next = current.filter(|c| !c.deleted)?.clone();
                if let Some(nick) = &patch.nick {
                    next.nick = Some(nick.clone()).filter(|n| !n.is_empty());
                }
                if let Some(avatar) = &patch.avatar {
                    next.avatar = Some(avatar.clone()).filter(|a| !a.is_empty());
                }
                if let Some(role) = &role {
                    next.role = role.clone();
                }
                if let Some(hash) = &hash {
                    next.password_hash = hash.clone();
                    next.token_epoch += 1;
                }
                Some(next)
            })
            .await?;
        written.ok_or_else(|| AccountError::NotFound(id.to_string()))
    }

    /// Bans, unbans, logs out everywhere, or deletes a user.
    pub async fn set_access(&self, id: &str, access: Access) -> Result<UserRecord, AccountError> {
        let written = self
            .store
            .edit_user(id, move |current| {
                let mut next = current.filter(|c| !c.deleted)?.clone();
                match access {
                    Access::Ban => next.banned = true,
                    Access::Unban => next.banned = false,
                    Access::Logout => {}
                    Access::Delete => next.deleted = true,
                }
                if access != Access::Unban {
                    next.token_epoch += 1;
                }
                Some(next)
            })
            .await?;
        written.ok_or_else(|| AccountError::NotFound(id.to_string()))
    }

    async fn hash(&self, password: &str) -> Result<String, AccountError> {
        if password.is_empty() || password.len() > MAX_PASSWORD {
            return Err(AccountError::Invalid(format!("the password must be 1 to {MAX_PASSWORD} bytes")));
        }
        match self.passwords.hash(password, self.cost).await {
            Ok(hash) => hash.map_err(|e| AccountError::Invalid(e.to_string())),
            Err(auth::PoolError::Busy) => Err(AccountError::Busy),
            Err(auth::PoolError::Stopped) => Err(AccountError::Store(StoreError::Closed)),
        }
    }
}

fn check_role(role: &str) -> Result<&'static str, AccountError> {
    ROLES.into_iter().find(|r| *r == role).ok_or_else(|| AccountError::Invalid(format!("role {role:?}: one of user, agent, admin")))
}

fn check_texts(nick: Option<&str>, avatar: Option<&str>) -> Result<(), AccountError> {
    for (name, value) in [("nick", nick), ("avatar", avatar)] {
        if value.is_some_and(|v| v.len() > MAX_TEXT) {
            return Err(AccountError::Invalid(format!("{name} is longer than {MAX_TEXT} bytes")));
        }
    }
    Ok(())
}

/// A user as the admin API shows it (never the password hash).
pub fn view(user: &UserRecord) -> Value {
    json!({
        "id": user.user_id,
        "nick": user.nick,
        "avatar": user.avatar,
        "role": user.role,
        "banned": user.banned,
    })
}
