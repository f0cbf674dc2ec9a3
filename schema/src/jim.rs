//! The J-IM JSON dialect: parsing requests leniently (3.x names, 2.x aliases, case-insensitive
//! keys, integers as numbers or numeric strings) and writing replies exactly (fields in fastjson's
//! alphabetical order, nulls left out, `command` as a number, `msg` from the status table).
//!
//! J-IM's names (`ChatBody`, `RespBody`) stay inside this module.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::{Command, Status};

/// Longest user or group id accepted.
pub const MAX_ID_LEN: usize = 64;
/// Largest `count` a history or sync request may ask for.
pub const MAX_PAGE: u32 = 1000;
/// `count` when a history request gives none.
pub const DEFAULT_PAGE: u32 = 100;
/// The heartbeat byte J-IM answers with.
pub const HEARTBEAT_BYTE: i64 = -128;
/// The handshake byte J-IM answers with.
pub const HANDSHAKE_BYTE: i64 = -127;

// ---------------------------------------------------------------------------------------------
// Requests

/// A request, parsed and checked for shape (not for permission).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// cmd 1.
    Handshake,
    /// cmd 3.
    Auth {
        /// The token to check.
        token: String,
    },
    /// cmd 5.
    Login(LoginReq),
    /// cmd 7.
    JoinGroup {
        /// The group to join.
        group_id: String,
        /// A display name for the group, used when the join creates it.
        name: Option<String>,
    },
    /// cmd 11.
    Chat(ChatReq),
    /// cmd 13.
    Heartbeat,
    /// cmd 14. `user_id` names whose connections to close; `None` means this connection.
    Close {
        /// The user whose connections to close.
        user_id: Option<String>,
    },
    /// cmd 15.
    Recall {
        /// The server id of the message.
        id: String,
    },
    /// cmd 17.
    GetUser {
        /// The user asked about.
        user_id: String,
        /// Which group members to list.
        filter: UserFilter,
    },
    /// cmd 19.
    GetMessage(MessageQuery),
    /// cmd 100 / 101.
    Typing {
        /// Whom the indicator is for.
        target: Target,
        /// true for start (100), false for stop (101).
        started: bool,
    },
    /// cmd 102 / 103.
    Receipt {
        /// Which conversation.
        target: Target,
        /// Everything up to and including this `seq` is delivered (or read).
        seq: u64,
        /// true for a read receipt (103), false for a delivery receipt (102).
        read: bool,
    },
    /// cmd 106.
    LeaveGroup {
        /// The group to leave.
        group_id: String,
    },
    /// cmd 104.
    Sync {
        /// Which conversation.
        target: Target,
        /// Return messages with a `seq` greater than this.
        after: u64,
        /// At most this many.
        limit: u32,
    },
}

/// A login by password or by token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginReq {
    /// 3.x `userId`, 2.x `loginname`.
    pub user_id: Option<String>,
    /// The password.
    pub password: Option<String>,
    /// A token from an earlier login, instead of a password.
    pub token: Option<String>,
    /// A display name to register with (dev profile).
    pub nick: Option<String>,
}

/// Who a chat, typing indicator or receipt is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A private chat with this user (chatType 2).
    User(String),
    /// A group (chatType 1).
    Group(String),
}

/// A chat send (cmd 11).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatReq {
    /// The client's `id`: an idempotency key.
    pub client_id: Option<String>,
    /// `from` as the client wrote it; the server replaces it with the authenticated user.
    pub from: Option<String>,
    /// The recipient.
    pub target: Target,
    /// `msgType` (0 text, 1 image, 2 voice, 3 video, 4 music, 5 news), not validated, as J-IM.
    pub msg_type: i64,
    /// The content.
    pub content: String,
    /// `extras`, plus every field the dialect does not know.
    pub extras: Option<Map<String, Value>>,
}

/// cmd 17 `type`: which members of each group to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserFilter {
    /// 0: online members only.
    Online,
    /// 1: offline members only.
    Offline,
    /// 2 (or missing): everyone.
    All,
}

/// cmd 19.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageQuery {
    /// Offline (type 0) or history (type 1).
    pub history: bool,
    /// `userId` as sent; must be the caller when present.
    pub user_id: Option<String>,
    /// `fromUserId`: the peer of a private conversation.
    pub peer: Option<String>,
    /// `groupId`.
    pub group: Option<String>,
    /// `beginTime`, epoch ms, inclusive.
    pub begin: Option<i64>,
    /// `endTime`, epoch ms, inclusive.
    pub end: Option<i64>,
    /// `offset`.
    pub offset: u32,
    /// `count`.
    pub count: Option<u32>,
}

/// A request that cannot be carried out as sent. This is a request error: it gets a reply and the
/// connection stays open (except a failed login, which J-IM closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestError {
    /// The command of the reply.
    pub command: Command,
    /// The status of the reply.
    pub status: Status,
}

impl RequestError {
    fn new(command: Command, status: Status) -> RequestError {
        RequestError { command, status }
    }

    /// The reply body.
    pub fn reply(self) -> Vec<u8> {
        status_reply(self.command, self.status)
    }
}

/// Parses a request. `cmd` comes from the TCP header; on WebSocket it is `None` and the `cmd`
/// field of the JSON decides.
pub fn parse_request(cmd: Option<Command>, body: &[u8]) -> Result<Request, RequestError> {
    let unknown = RequestError::new(Command::Unknown, Status::UnknownCmd);
    let fields = Fields::parse(body);
    let cmd = match cmd {
        Some(cmd) => cmd,
        None => {
            let fields = fields.as_ref().map_err(|_| unknown)?;
            let code = fields.int(&["cmd"]).map_err(|_| unknown)?.ok_or(unknown)?;
            Command::from_code(code).ok_or(unknown)?
        }
    };
    let fail = failure_for(cmd).ok_or(unknown)?;
    let empty = Fields::default();
    let f = match (&fields, cmd) {
        (Ok(f), _) => f,
        // J-IM's heartbeat and handshake ignore their bodies; a bare close closes this connection.
        (Err(_), Command::HeartbeatReq | Command::HandshakeReq) if body.iter().all(u8::is_ascii_whitespace) => &empty,
        (Err(_), Command::CloseReq) if body.iter().all(u8::is_ascii_whitespace) => &empty,
        (Err(_), _) => return Err(fail),
    };
    let bad = |_| fail;
    let req = match cmd {
        Command::HandshakeReq => Request::Handshake,
        Command::HeartbeatReq => Request::Heartbeat,
        Command::AuthReq => Request::Auth { token: f.string(&["token"]).map_err(bad)?.filter(|t| !t.is_empty()).ok_or(fail)? },
        Command::LoginReq => Request::Login(LoginReq {
            user_id: f.id(&["userId", "loginname", "id"]).map_err(bad)?,
            password: f.string(&["password"]).map_err(bad)?,
            token: f.string(&["token"]).map_err(bad)?.filter(|t| !t.is_empty()),
            nick: f.string(&["nick"]).map_err(bad)?,
        }),
        Command::JoinGroupReq => {
            Request::JoinGroup { group_id: f.id(&["groupId", "group"]).map_err(bad)?.ok_or(fail)?, name: f.string(&["name"]).map_err(bad)? }
        }
        Command::ChatReq => Request::Chat(parse_chat(f).map_err(bad)?),
        Command::CloseReq => Request::Close { user_id: f.id(&["userId"]).map_err(bad)? },
        Command::CancelMsgReq => Request::Recall { id: f.string(&["id", "msgId"]).map_err(bad)?.ok_or(fail)? },
        Command::GetUserReq => Request::GetUser {
            user_id: f.id(&["userId"]).map_err(bad)?.ok_or(fail)?,
            filter: match f.int(&["type"]).map_err(bad)? {
                Some(0) => UserFilter::Online,
                Some(1) => UserFilter::Offline,
                Some(2) | None => UserFilter::All,
                Some(_) => return Err(fail),
            },
        },
        Command::GetMessageReq => Request::GetMessage(MessageQuery {
            history: match f.int(&["type"]).map_err(bad)? {
                Some(0) => false,
                Some(1) => true,
                _ => return Err(fail),
            },
            user_id: f.id(&["userId"]).map_err(bad)?,
            peer: f.id(&["fromUserId"]).map_err(bad)?,
            group: f.id(&["groupId"]).map_err(bad)?,
            begin: f.int(&["beginTime"]).map_err(bad)?,
            end: f.int(&["endTime"]).map_err(bad)?,
            offset: f.uint(&["offset"]).map_err(bad)?.unwrap_or(0),
            count: f.uint(&["count"]).map_err(bad)?.map(|c| c.min(MAX_PAGE)),
        }),
        Command::TypingStart | Command::TypingStop => {
            Request::Typing { target: target(f).map_err(bad)?.ok_or(fail)?, started: cmd == Command::TypingStart }
        }
        Command::DeliveryReceipt | Command::ReadReceipt => Request::Receipt {
            target: target(f).map_err(bad)?.ok_or(fail)?,
            seq: f.int(&["seq"]).map_err(bad)?.and_then(|s| u64::try_from(s).ok()).ok_or(fail)?,
            read: cmd == Command::ReadReceipt,
        },
        Command::SyncReq => Request::Sync {
            target: target(f).map_err(bad)?.ok_or(fail)?,
            after: f.int(&["seq"]).map_err(bad)?.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
            limit: f.uint(&["count"]).map_err(bad)?.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
        },
        Command::LeaveGroupReq => Request::LeaveGroup { group_id: f.id(&["groupId", "group"]).map_err(bad)?.ok_or(fail)? },
        _ => return Err(unknown),
    };
    Ok(req)
}

/// The reply a malformed request of this command gets; `None` for commands a client may not send.
fn failure_for(cmd: Command) -> Option<RequestError> {
    let (command, status) = match cmd {
        Command::HandshakeReq => (Command::HandshakeResp, Status::InvalidVerification),
        Command::AuthReq => (Command::AuthResp, Status::AuthFailed),
        Command::LoginReq => (Command::LoginResp, Status::LoginFailed),
        Command::JoinGroupReq => (Command::JoinGroupResp, Status::JoinGroupFailed),
        Command::ChatReq => (Command::ChatResp, Status::SendFailed),
        Command::HeartbeatReq => (Command::HeartbeatReq, Status::InvalidVerification),
        Command::CloseReq => (Command::CloseReq, Status::InvalidVerification),
        Command::CancelMsgReq => (Command::CancelMsgResp, Status::BadRequest),
        Command::GetUserReq => (Command::GetUserResp, Status::GetUserFailed),
        Command::GetMessageReq => (Command::GetMessageResp, Status::GetMessageFailed),
        Command::TypingStart | Command::TypingStop => (cmd, Status::BadRequest),
        Command::DeliveryReceipt | Command::ReadReceipt => (cmd, Status::BadRequest),
        Command::SyncReq => (Command::SyncResp, Status::BadRequest),
        Command::LeaveGroupReq => (Command::LeaveGroupResp, Status::BadRequest),
        _ => return None,
    };
    Some(RequestError::new(command, status))
}

/// The fields a chat body may carry; anything else goes to `extras`.
const CHAT_FIELDS: [&str; 12] =
    ["id", "cmd", "createtime", "extras", "from", "to", "groupid", "chattype", "msgtype", "content", "nick", "avatar"];

fn parse_chat(f: &Fields) -> Result<ChatReq, FieldError> {
    let target = match f.int(&["chatType"])? {
        Some(1) => Target::Group(f.id(&["groupId"])?.ok_or(FieldError)?),
        Some(2) => Target::User(f.id(&["to"])?.ok_or(FieldError)?),
        _ => return Err(FieldError),
    };
    let mut extras = match f.get(&["extras"]) {
        Some(Value::Object(map)) => Some(map.clone()),
        None | Some(Value::Null) => None,
        Some(_) => return Err(FieldError),
    };
    for (norm, (original, value)) in &f.map {
        if !CHAT_FIELDS.contains(&norm.as_str()) {
            extras.get_or_insert_with(Map::new).insert(original.clone(), value.clone());
        }
    }
    let client_id = f.string(&["id"])?.filter(|id| !id.is_empty());
    if client_id.as_ref().is_some_and(|id| id.len() > MAX_ID_LEN) {
        return Err(FieldError);
    }
    Ok(ChatReq {
        client_id,
        from: f.string(&["from"])?,
        target,
        msg_type: f.int(&["msgType"])?.unwrap_or(0),
        content: f.string(&["content"])?.unwrap_or_default(),
        extras,
    })
}

fn target(f: &Fields) -> Result<Option<Target>, FieldError> {
    if let Some(group) = f.id(&["groupId"])? {
        return Ok(Some(Target::Group(group)));
    }
    Ok(f.id(&["to"])?.map(Target::User))
}

/// A field had the wrong type or an invalid value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldError;

impl<'de> serde::Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Fields, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<Fields, A::Error> {
                let mut map = std::collections::BTreeMap::new();
                while let Some((key, value)) = entries.next_entry::<String, Value>()? {
                    map.insert(normalize(&key), (key, value));
                }
                Ok(Fields { map })
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// A JSON object whose keys are matched the way fastjson matches them: case-insensitively and
/// ignoring underscores (`group_id` ≡ `groupId`).
#[derive(Debug, Default)]
pub struct Fields {
    map: std::collections::BTreeMap<String, (String, Value)>,
}

impl Fields {
    /// Parses a JSON object; anything else is an error. Keys go straight into the map (no
    /// intermediate `serde_json::Map`); of two keys that normalise alike, the later one in the
    /// body wins, as a repeated key does in JSON.
    pub fn parse(body: &[u8]) -> Result<Fields, FieldError> {
        serde_json::from_slice::<Fields>(body).map_err(|_| FieldError)
    }

    /// The first present, non-null value among `names`.
    pub fn get(&self, names: &[&str]) -> Option<&Value> {
        names.iter().find_map(|n| self.lookup(n).filter(|v| !v.is_null()))
    }

    /// The value under `name`, matched as the keys were. The names asked for are short ASCII
    /// literals, normalised on the stack: a chat request asks about a dozen times.
    fn lookup(&self, name: &str) -> Option<&Value> {
        let mut buf = [0u8; 32];
        if name.len() > buf.len() || !name.is_ascii() {
            return self.map.get(&normalize(name)).map(|(_, v)| v);
        }
        let mut len = 0;
        for b in ascii_folded(name) {
            buf[len] = b;
            len += 1;
        }
        let key = std::str::from_utf8(&buf[..len]).ok()?;
        self.map.get(key).map(|(_, v)| v)
    }

    /// A string; a number is accepted and written out.
    pub fn string(&self, names: &[&str]) -> Result<Option<String>, FieldError> {
        match self.get(names) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(FieldError),
        }
    }

    /// A user or group id: 1 to 64 characters, none of them `:` or a control character.
    /// An empty string counts as absent, as J-IM's query parser drops empty values.
    pub fn id(&self, names: &[&str]) -> Result<Option<String>, FieldError> {
        match self.string(names)? {
            Some(s) if s.is_empty() => Ok(None),
            Some(s) if valid_id(&s) => Ok(Some(s)),
            Some(_) => Err(FieldError),
            None => Ok(None),
        }
    }

    /// An integer given as a JSON number (integral floats too: J-IM clients send times as
    /// doubles) or a numeric string. An empty string counts as absent.
    pub fn int(&self, names: &[&str]) -> Result<Option<i64>, FieldError> {
        match self.get(names) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    return Ok(Some(i));
                }
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                    _ => Err(FieldError),
                }
            }
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => {
                let s = s.trim();
                s.parse::<i64>()
                    .or_else(|_| match s.parse::<f64>() {
                        Ok(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(f as i64),
                        _ => Err(FieldError),
                    })
                    .map(Some)
            }
            Some(_) => Err(FieldError),
        }
    }

    /// A non-negative integer that fits in u32.
    pub fn uint(&self, names: &[&str]) -> Result<Option<u32>, FieldError> {
        self.int(names)?.map(|i| u32::try_from(i).map_err(|_| FieldError)).transpose()
    }
}

fn normalize(key: &str) -> String {
    if key.is_ascii() {
        return ascii_folded(key).map(char::from).collect();
    }
    key.chars().filter(|c| *c != '_').flat_map(char::to_lowercase).collect()
}

/// An ASCII key's bytes as keys are matched: underscores dropped, letters lowercased (what
/// `normalize` does to any key, byte by byte).
fn ascii_folded(key: &str) -> impl Iterator<Item = u8> + '_ {
    key.bytes().filter(|b| *b != b'_').map(|b| b.to_ascii_lowercase())
}

/// Whether `s` can be a user or group id.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && !s.chars().any(|c| c == ':' || c.is_control())
}

// ---------------------------------------------------------------------------------------------
// Replies and pushes

/// J-IM's `RespBody`: `{"code","command","data","msg"}`, fields in that (alphabetical) order,
/// nulls left out.
#[derive(Serialize)]
struct RespBody<'a, D: Serialize> {
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u32>,
    command: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<D>,
    #[serde(skip_serializing_if = "Option::is_none")]
    msg: Option<&'a str>,
}

fn to_vec<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail: every map key is a string.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A reply with a status and optional data.
pub fn resp<D: Serialize>(command: Command, status: Status, data: Option<D>) -> Vec<u8> {
    to_vec(&RespBody { code: Some(status.code()), command: command.code(), data, msg: Some(status.msg()) })
}

/// A reply with a status and no data.
pub fn status_reply(command: Command, status: Status) -> Vec<u8> {
    resp::<()>(command, status, None)
}

/// A push or reply without code and msg: `{"command":N,"data":…}` (chat push, heartbeat, exit
/// notify, typing, receipts).
pub fn push<D: Serialize>(command: Command, data: &D) -> Vec<u8> {
    to_vec(&RespBody::<&D> { code: None, command: command.code(), data: Some(data), msg: None })
}

/// The heartbeat reply.
pub fn heartbeat_reply() -> Vec<u8> {
    push(Command::HeartbeatReq, &serde_json::json!({ "hbbyte": HEARTBEAT_BYTE }))
}

/// The handshake reply.
pub fn handshake_reply() -> Vec<u8> {
    push(Command::HandshakeResp, &serde_json::json!({ "hbyte": HANDSHAKE_BYTE }))
}

/// A user as it appears in notifications and member lists (3.x field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserView {
    /// Avatar URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nick: Option<String>,
    /// "online" or "offline".
    pub status: &'static str,
    /// The user id.
    #[serde(rename = "userId")]
    pub user_id: String,
}

/// The 3.x join notification (cmd 9): user and group at the top level, no `data`.
pub fn join_notify(group: &str, user: &UserView) -> Vec<u8> {
    #[derive(Serialize)]
    struct JoinNotify<'a> {
        code: u32,
        command: u8,
        group: &'a str,
        msg: &'static str,
        user: &'a UserView,
    }
    let status = Status::JoinGroupOk;
    to_vec(&JoinNotify { code: status.code(), command: Command::JoinGroupNotify.code(), group, msg: status.msg(), user })
}

/// The 3.x exit notification (cmd 10).
pub fn exit_notify(group: &str, user: &UserView) -> Vec<u8> {
    push(Command::ExitGroupNotify, &serde_json::json!({ "group": group, "user": user }))
}

/// A group with its members, as in the cmd 18 reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupView {
    /// Avatar URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// The group id.
    #[serde(rename = "groupId")]
    pub group_id: String,
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How many members are online.
    pub online: u32,
    /// Members, filtered by the request's type.
    pub users: Vec<UserView>,
}

/// The user object of the cmd 18 reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserInfo {
    /// Avatar URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// Friend categories, each with users (kefu lists private-chat contacts under one).
    pub friends: Vec<GroupView>,
    /// The user's groups, each with its members.
    pub groups: Vec<GroupView>,
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nick: Option<String>,
    /// "online" or "offline".
    pub status: &'static str,
    /// Transport of the asking connection ("tcp", "ws", "http").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminal: Option<&'static str>,
    /// The user id.
    #[serde(rename = "userId")]
    pub user_id: String,
}

/// A stored chat message as J-IM's `ChatBody`, with kefu's additions (`seq`, `clientId`,
/// `nick`, `avatar`, `recalled`). Fields in alphabetical order.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ChatBody {
    /// Sender's avatar.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// 1 group, 2 private.
    #[serde(rename = "chatType")]
    pub chat_type: u8,
    /// The sender's idempotency key, when it gave one.
    #[serde(rename = "clientId", skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Always 11.
    pub cmd: u8,
    /// Content (empty once recalled).
    pub content: String,
    /// Server time of the commit, epoch ms.
    #[serde(rename = "createTime")]
    pub create_time: i64,
    /// Extra fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extras: Option<Map<String, Value>>,
    /// Sender.
    pub from: String,
    /// Group, for chatType 1.
    #[serde(rename = "groupId", skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Server id: 32 lowercase hex, time-ordered.
    pub id: String,
    /// Message type.
    #[serde(rename = "msgType")]
    pub msg_type: i64,
    /// Sender's nick.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nick: Option<String>,
    /// Set when the message was recalled.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub recalled: bool,
    /// Position in the conversation: 1, 2, 3 …
    pub seq: u64,
    /// Recipient, for chatType 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// Data of a successful chat reply (cmd 12): which server id and seq the message got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatAck<'a> {
    /// The sender's idempotency key, echoed.
    #[serde(rename = "clientId", skip_serializing_if = "Option::is_none")]
    pub client_id: Option<&'a str>,
    /// The conversation.
    pub conversation: &'a str,
    /// Server id.
    pub id: &'a str,
    /// Position in the conversation.
    pub seq: u64,
}

#[cfg(test)]
mod tests;
