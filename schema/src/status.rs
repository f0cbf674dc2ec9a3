//! Status codes. 10000–10021 are J-IM's (`ImStatus`), with `msg` = description + space + text,
//! byte for byte. kefu's own codes start at 11000 and keep the same `msg` shape.

/// A status code with its fixed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// 10000 ok, sent.
    Ok,
    /// 10001 the user is offline (the message is stored for them).
    Offline,
    /// 10002 the chat body is malformed.
    SendFailed,
    /// 10003 got the user.
    GetUserOk,
    /// 10004 could not get the user.
    GetUserFailed,
    /// 10005 got the online users.
    GetOnlineUsersOk,
    /// 10006 got the offline users.
    GetOfflineUsersOk,
    /// 10007 logged in.
    LoginOk,
    /// 10008 login failed.
    LoginFailed,
    /// 10009 authenticated.
    AuthOk,
    /// 10010 authentication failed.
    AuthFailed,
    /// 10011 joined the group.
    JoinGroupOk,
    /// 10012 could not join the group.
    JoinGroupFailed,
    /// 10013 the TCP version byte is not 0x01.
    ProtocolVersionMismatch,
    /// 10014 the TCP cmd byte is not a known command.
    UnsupportedCmd,
    /// 10015 could not get messages.
    GetMessageFailed,
    /// 10016 got offline messages.
    GetOfflineMessageOk,
    /// 10017 unknown command (or a body that is not JSON on WebSocket).
    UnknownCmd,
    /// 10018 got history messages.
    GetHistoryMessageOk,
    /// 10019 the user is online.
    Online,
    /// 10020 invalid request parameters.
    InvalidVerification,
    /// 10021 closed.
    CloseOk,
    /// 11001 kefu: the request is not allowed for this user (not a member, not the sender…).
    Forbidden,
    /// 11002 kefu: the message or user was not found.
    NotFound,
    /// 11003 kefu: the recall window has passed.
    RecallExpired,
    /// 11004 kefu: too many messages on this connection; slow down.
    RateLimited,
    /// 11005 kefu: the frame or body is larger than the limit; the connection closes.
    FrameTooLarge,
    /// 11006 kefu: the TCP header declares a negative body length; the connection closes.
    BadLength,
    /// 11007 kefu: temporarily unavailable (storage or owner unreachable); retry the same request.
    Retryable,
    /// 11008 kefu: too many failed logins from this address; wait and retry.
    LoginThrottled,
    /// 11009 kefu: the client did not read fast enough; the connection closes.
    SlowConsumer,
    /// 11010 kefu: log in first.
    NotLoggedIn,
    /// 11011 kefu: no traffic within the heartbeat timeout; the connection closes.
    HeartbeatTimeout,
    /// 11012 kefu: the request is missing a field or has a field of the wrong type.
    BadRequest,
    /// 11013 kefu: signed out everywhere (password changed, banned, deleted or logged out by an
    /// admin); the connection closes and the user's tokens no longer work.
    SignedOut,
    /// 11014 kefu: what the request would create exists already.
    Exists,
    /// 11015 kefu: the node is busy (a login storm); retry the same request a little later.
    Busy,
}

impl Status {
    /// Every status, in code order.
    pub const ALL: [Status; 37] = [
        Status::Ok,
        Status::Offline,
        Status::SendFailed,
        Status::GetUserOk,
        Status::GetUserFailed,
        Status::GetOnlineUsersOk,
        Status::GetOfflineUsersOk,
        Status::LoginOk,
        Status::LoginFailed,
        Status::AuthOk,
        Status::AuthFailed,
        Status::JoinGroupOk,
        Status::JoinGroupFailed,
        Status::ProtocolVersionMismatch,
        Status::UnsupportedCmd,
        Status::GetMessageFailed,
        Status::GetOfflineMessageOk,
        Status::UnknownCmd,
        Status::GetHistoryMessageOk,
        Status::Online,
        Status::InvalidVerification,
        Status::CloseOk,
        Status::Forbidden,
        Status::NotFound,
        Status::RecallExpired,
        Status::RateLimited,
        Status::FrameTooLarge,
        Status::BadLength,
        Status::Retryable,
        Status::LoginThrottled,
        Status::SlowConsumer,
        Status::NotLoggedIn,
        Status::HeartbeatTimeout,
        Status::BadRequest,
        Status::SignedOut,
        Status::Exists,
        Status::Busy,
    ];

    /// The numeric code.
    pub fn code(self) -> u32 {
        match self {
            Status::Ok => 10000,
            Status::Offline => 10001,
            Status::SendFailed => 10002,
            Status::GetUserOk => 10003,
            Status::GetUserFailed => 10004,
            Status::GetOnlineUsersOk => 10005,
            Status::GetOfflineUsersOk => 10006,
            Status::LoginOk => 10007,
            Status::LoginFailed => 10008,
            Status::AuthOk => 10009,
            Status::AuthFailed => 10010,
            Status::JoinGroupOk => 10011,
            Status::JoinGroupFailed => 10012,
            Status::ProtocolVersionMismatch => 10013,
            Status::UnsupportedCmd => 10014,
            Status::GetMessageFailed => 10015,
            Status::GetOfflineMessageOk => 10016,
            Status::UnknownCmd => 10017,
            Status::GetHistoryMessageOk => 10018,
            Status::Online => 10019,
            Status::InvalidVerification => 10020,
            Status::CloseOk => 10021,
            Status::Forbidden => 11001,
            Status::NotFound => 11002,
            Status::RecallExpired => 11003,
            Status::RateLimited => 11004,
            Status::FrameTooLarge => 11005,
            Status::BadLength => 11006,
            Status::Retryable => 11007,
            Status::LoginThrottled => 11008,
            Status::SlowConsumer => 11009,
            Status::NotLoggedIn => 11010,
            Status::HeartbeatTimeout => 11011,
            Status::BadRequest => 11012,
            Status::SignedOut => 11013,
            Status::Exists => 11014,
            Status::Busy => 11015,
        }
    }

    /// The `msg` text: description, a space, then the (Chinese) text, as J-IM sends it.
    pub fn msg(self) -> &'static str {
        match self {
            Status::Ok => "ok 发送成功",
            Status::Offline => "offline 用户不在线",
            Status::SendFailed => "send failed 消息发送失败,数据格式不正确,请参考:{'from':来源ID,'to':目标ID,'cmd':'消息命令码','createTime':消息创建时间(Long型),'msgType':Integer消息类型,'content':内容}",
            Status::GetUserOk => "ok 获取用户信息成功!",
            Status::GetUserFailed => "get user failed ! 获取用户信息失败!",
            Status::GetOnlineUsersOk => "ok 获取所有在线用户信息成功!",
            Status::GetOfflineUsersOk => "ok 获取所有离线用户信息成功!",
            Status::LoginOk => "ok 登录成功!",
            Status::LoginFailed => "login failed ! 登录失败!",
            Status::AuthOk => "ok 鉴权成功!",
            Status::AuthFailed => "auth failed! 鉴权失败!",
            Status::JoinGroupOk => "join group ok! 加入群组成功!",
            Status::JoinGroupFailed => "join group failed! 加入群组失败!",
            Status::ProtocolVersionMismatch => "Protocol version number does not match 协议版本号不匹配!",
            Status::UnsupportedCmd => "unsupported cmd command 不支持的cmd命令!",
            Status::GetMessageFailed => "get user message failed! 获取用户消息失败!",
            Status::GetOfflineMessageOk => "get user message ok! 获取离线消息成功!",
            Status::UnknownCmd => "cmd failed! 未知的cmd命令!",
            Status::GetHistoryMessageOk => "get user message ok! 获取历史消息成功!",
            Status::Online => "online 用户在线",
            Status::InvalidVerification => "Invalid verification! 不合法校验",
            Status::CloseOk => "close ok! 关闭成功",
            Status::Forbidden => "forbidden 无权操作",
            Status::NotFound => "not found 未找到",
            Status::RecallExpired => "recall window expired 超过撤回时限",
            Status::RateLimited => "rate limited 发送过于频繁",
            Status::FrameTooLarge => "frame too large 数据包过大",
            Status::BadLength => "bad body length 数据包长度不合法",
            Status::Retryable => "temporarily unavailable, retry 暂时不可用,请重试",
            Status::LoginThrottled => "too many failed logins 登录失败次数过多",
            Status::SlowConsumer => "slow consumer 接收过慢",
            Status::NotLoggedIn => "not logged in 未登录",
            Status::HeartbeatTimeout => "heartbeat timeout 心跳超时",
            Status::BadRequest => "bad request 请求格式不正确",
            Status::SignedOut => "signed out 已在所有设备退出登录",
            Status::Exists => "already exists 已存在",
            Status::Busy => "busy, retry 服务繁忙,请稍后重试",
        }
    }

    /// The status with this code, if any.
    pub fn from_code(code: u32) -> Option<Status> {
        Status::ALL.iter().copied().find(|s| s.code() == code)
    }

    /// Whether a client may retry the same request unchanged and expect it to succeed later.
    pub fn is_retryable(self) -> bool {
        matches!(self, Status::Retryable | Status::RateLimited | Status::LoginThrottled | Status::Busy)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
        let jim: Vec<u32> = Status::ALL.iter().map(|s| s.code()).filter(|c| *c < 11000).collect();
        assert_eq!(jim, (10000..=10021).collect::<Vec<_>>());
    }
}
