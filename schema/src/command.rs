//! Command codes: J-IM's 0–20 keep their numbers; kefu's own extensions start at 100 because
//! forks of J-IM disagree about 21 and up.

/// A command code as it appears in the TCP header byte and in the JSON `cmd` / `command` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    /// Unknown command; also the command of the "unknown cmd" error reply.
    Unknown = 0,
    /// Handshake request (a WebSocket upgrade is turned into this).
    HandshakeReq = 1,
    /// Handshake response.
    HandshakeResp = 2,
    /// Authenticate with a token.
    AuthReq = 3,
    /// Reply to [`Command::AuthReq`].
    AuthResp = 4,
    /// Log in with a user id and password (or a token).
    LoginReq = 5,
    /// Reply to [`Command::LoginReq`].
    LoginResp = 6,
    /// Join a group.
    JoinGroupReq = 7,
    /// Reply to [`Command::JoinGroupReq`].
    JoinGroupResp = 8,
    /// "X joined the group", sent to every online member including the joiner.
    JoinGroupNotify = 9,
    /// "X left the group", sent to the remaining online members.
    ExitGroupNotify = 10,
    /// Send a chat message; also the command of a chat pushed to its recipients.
    ChatReq = 11,
    /// Send status returned to the sender.
    ChatResp = 12,
    /// Heartbeat; the reply carries the same command.
    HeartbeatReq = 13,
    /// Close the connection (or every connection of the user).
    CloseReq = 14,
    /// Recall a message.
    CancelMsgReq = 15,
    /// Recall notification and reply.
    CancelMsgResp = 16,
    /// Get a user, with groups and online members.
    GetUserReq = 17,
    /// Reply to [`Command::GetUserReq`].
    GetUserResp = 18,
    /// Get offline (type 0) or history (type 1) messages.
    GetMessageReq = 19,
    /// Reply to [`Command::GetMessageReq`].
    GetMessageResp = 20,
    /// kefu: the sender started typing. Pushed to the other side with the same code.
    TypingStart = 100,
    /// kefu: the sender stopped typing.
    TypingStop = 101,
    /// kefu: delivery receipt up to a `seq`; advances the delivered cursor.
    DeliveryReceipt = 102,
    /// kefu: read receipt up to a `seq`; advances the read cursor.
    ReadReceipt = 103,
    /// kefu: fetch a conversation's messages after a `seq` cursor.
    SyncReq = 104,
    /// kefu: reply to [`Command::SyncReq`].
    SyncResp = 105,
    /// kefu: leave a group `{"groupId"}`; the other members get J-IM's exit notice (cmd 10).
    LeaveGroupReq = 106,
    /// kefu: reply to [`Command::LeaveGroupReq`].
    LeaveGroupResp = 107,
    /// kefu: a customer-service conversation changed (pushed to its visitor and to agents):
    /// `{"conversation": {…}, "queuePosition"?: n}`.
    SupportEvent = 108,
}

impl Command {
    /// Every known command, in code order.
    pub const ALL: [Command; 30] = [
        Command::Unknown,
        Command::HandshakeReq,
        Command::HandshakeResp,
        Command::AuthReq,
        Command::AuthResp,
        Command::LoginReq,
        Command::LoginResp,
        Command::JoinGroupReq,
        Command::JoinGroupResp,
        Command::JoinGroupNotify,
        Command::ExitGroupNotify,
        Command::ChatReq,
        Command::ChatResp,
        Command::HeartbeatReq,
        Command::CloseReq,
        Command::CancelMsgReq,
        Command::CancelMsgResp,
        Command::GetUserReq,
        Command::GetUserResp,
        Command::GetMessageReq,
        Command::GetMessageResp,
        Command::TypingStart,
        Command::TypingStop,
        Command::DeliveryReceipt,
        Command::ReadReceipt,
        Command::SyncReq,
        Command::SyncResp,
        Command::LeaveGroupReq,
        Command::LeaveGroupResp,
        Command::SupportEvent,
    ];

    /// The command with this code, if it is one we know.
    pub fn from_code(code: i64) -> Option<Command> {
        let code = u8::try_from(code).ok()?;
        Command::ALL.iter().copied().find(|c| *c as u8 == code)
    }

    /// The numeric code.
    pub fn code(self) -> u8 {
        self as u8
    }
}
