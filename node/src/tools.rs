//! Operators' commands of `kefu-node` that do not run the node: users on a stopped node's data
//! dir (`kefu-node user …`), and the key files (`kefu-node keys new`, `kefu-node token-key …`).
//! A running node holds its data dir's lock; then the user commands refuse and point at the HTTP
//! API, because two processes handing out revisions of one database would collide.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::accounts::{Access, Accounts, NewUser, UserPatch};
use crate::config::{Config, Flags};
use crate::metrics::Metrics;
use crate::store::Store;

/// `kefu-node <tool>`.
#[derive(Debug, clap::Subcommand)]
pub enum Tool {
    /// Users in the data dir of a stopped node (a running node: use POST/PATCH /v1/users).
    #[command(subcommand)]
    User(UserCommand),
    /// Makes the key files a production node needs.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Makes and rotates the cluster's token key file.
    #[command(subcommand)]
    TokenKey(TokenKeyCommand),
}

/// `kefu-node user …`.
#[derive(Debug, clap::Subcommand)]
pub enum UserCommand {
    /// Creates a user; the password is read from standard input unless --password is given.
    Add {
        /// User id.
        id: String,
        /// user, agent or admin.
        #[arg(long, default_value = "user")]
        role: String,
        /// Display name (default: the id).
        #[arg(long)]
        nick: Option<String>,
        /// The password (visible to other local users in the process list; stdin is safer).
        #[arg(long)]
        password: Option<String>,
    },
    /// Sets a new password (from standard input unless --password); ends the user's sessions.
    Passwd {
        /// User id.
        id: String,
        /// The password.
        #[arg(long)]
        password: Option<String>,
    },
    /// Sets the role: user, agent or admin.
    Role {
        /// User id.
        id: String,
        /// The role.
        role: String,
    },
    /// Bans a user: they cannot log in, and their tokens stop working.
    Ban {
        /// User id.
        id: String,
    },
    /// Lifts a ban.
    Unban {
        /// User id.
        id: String,
    },
    /// Deletes a user (the id can be created again).
    Delete {
        /// User id.
        id: String,
    },
    /// Lists the users.
    List,
}

/// `kefu-node keys …`.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Writes DIR/token.key and DIR/api.key (mode 0600); refuses to replace either.
    New {
        /// Directory for the two files.
        dir: PathBuf,
    },
}

/// `kefu-node token-key …`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenKeyCommand {
    /// Writes a new key file (mode 0600); refuses to replace one.
    New {
        /// The file.
        file: PathBuf,
    },
    /// Puts a new signing key first; the old keys keep verifying. Give every node the new file.
    Rotate {
        /// The file.
        file: PathBuf,
    },
    /// Keeps only the signing key: tokens signed by the older keys stop working.
    Retire {
        /// The file.
        file: PathBuf,
    },
}

/// Runs `tool`. Only the user tools resolve the node's configuration from `flags` (the data dir,
/// node id and hash cost): resolving it makes a data dir and its node id, which the key file
/// tools must not leave in the working directory of whoever runs `kefu-node keys new`.
pub async fn run(tool: Tool, flags: Flags) -> anyhow::Result<()> {
    match tool {
        Tool::Keys(KeysCommand::New { dir }) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let (token, api) = (dir.join("token.key"), dir.join("api.key"));
            for path in [&token, &api] {
                if path.exists() {
                    bail!("{} exists; not replacing it (remove it first if you mean to)", path.display());
                }
            }
            new_private(&token, crate::auth::new_key_line().as_bytes())?;
            new_private(&api, crate::auth::new_key_line().as_bytes())?;
            println!("wrote {} and {}", token.display(), api.display());
            println!("start with: kefu-node --profile prod --token-key-file {} --api-key-file {}", token.display(), api.display());
            Ok(())
        }
        Tool::TokenKey(TokenKeyCommand::New { file }) => {
            new_private(&file, crate::auth::new_key_line().as_bytes())?;
            println!("wrote {}", file.display());
            Ok(())
        }
        Tool::TokenKey(TokenKeyCommand::Rotate { file }) => {
            crate::auth::rotate_key_file(&file)?;
            println!(
                "{}: a new signing key is first; give every node this file, then retire the old key after the token lifetime",
                file.display()
            );
            Ok(())
        }
        Tool::TokenKey(TokenKeyCommand::Retire { file }) => {
            let removed = crate::auth::retire_old_keys(&file)?;
            println!("{}: removed {removed} old key(s)", file.display());
            Ok(())
        }
        Tool::User(command) => users(command, Config::resolve(flags)?).await,
    }
}

fn new_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if !crate::tls::create_private(path, bytes).with_context(|| format!("writing {}", path.display()))? {
        bail!("{} exists; not replacing it", path.display());
    }
    Ok(())
}

async fn users(command: UserCommand, config: Config) -> anyhow::Result<()> {
    let _lock = crate::lock_data_dir(&config.data_dir).map_err(|e| {
        anyhow::anyhow!("{e:#}: while the node runs, manage users with its HTTP API (POST /v1/users, PATCH /v1/users/ID, …)")
    })?;
    let (store, feed) =
        Store::open(&config.data_dir, &config.node_id, Arc::new(Metrics::default())).await.context("opening the database")?;
    // Nothing here delivers messages: the commit feed is not needed.
    drop(feed);
    let passwords = crate::auth::PasswordPool::new(1, 1);
    let accounts = Accounts { store: &store, cost: config.password_hash_cost, passwords: &passwords };
    let result = match command {
        UserCommand::Add { id, role, nick, password } => {
            let password = password_or_stdin(password)?;
            accounts.create(NewUser { id, password, nick, avatar: None, role: Some(role) }).await.map(Some)
        }
        UserCommand::Passwd { id, password } => {
            let password = password_or_stdin(password)?;
            accounts.patch(&id, UserPatch { password: Some(password), ..UserPatch::default() }).await.map(Some)
        }
        UserCommand::Role { id, role } => accounts.patch(&id, UserPatch { role: Some(role), ..UserPatch::default() }).await.map(Some),
        UserCommand::Ban { id } => accounts.set_access(&id, Access::Ban).await.map(Some),
        UserCommand::Unban { id } => accounts.set_access(&id, Access::Unban).await.map(Some),
        UserCommand::Delete { id } => accounts.set_access(&id, Access::Delete).await.map(|_| None),
        UserCommand::List => {
            let mut after = String::new();
            loop {
                let page = store.users(&after, 1000).await?;
                for u in &page {
                    println!("{}", crate::accounts::view(u));
                }
                match page.last() {
                    Some(last) if page.len() == 1000 => after = last.user_id.clone(),
                    _ => break,
                }
            }
            Ok(None)
        }
    };
    store.close().await;
    match result {
        Ok(Some(user)) => println!("{}", crate::accounts::view(&user)),
        Ok(None) => {}
        Err(e) => bail!("{e}"),
    }
    Ok(())
}

/// The given password, or the first line of standard input.
fn password_or_stdin(given: Option<String>) -> anyhow::Result<String> {
    if let Some(p) = given {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    if password.is_empty() {
        bail!("no password: give --password or one line on standard input");
    }
    Ok(password)
}
