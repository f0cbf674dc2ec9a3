#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
//! Snapshot tests: the exact bytes of every reply and push, and how each request parses.

use super::*;
use serde_json::json;

fn check(actual: Vec<u8>, expect: &str) {
    assert_eq!(String::from_utf8(actual).unwrap(), expect);
}

fn parse_ws(body: &str) -> Result<Request, RequestError> {
    parse_request(None, body.as_bytes())
}

#[test]
fn replies_match_jim_bytes() {
    check(resp::<()>(Command::ChatResp, Status::Ok, None), r#"{"code":10000,"command":12,"msg":"ok 发送成功"}"#);
    check(resp::<()>(Command::ChatResp, Status::Offline, None), r#"{"code":10001,"command":12,"msg":"offline 用户不在线"}"#);
    check(resp::<()>(Command::LoginResp, Status::LoginOk, None), r#"{"code":10007,"command":6,"msg":"ok 登录成功!"}"#);
    check(resp::<()>(Command::LoginResp, Status::LoginFailed, None), r#"{"code":10008,"command":6,"msg":"login failed ! 登录失败!"}"#);
    check(resp::<()>(Command::Unknown, Status::UnknownCmd, None), r#"{"code":10017,"command":0,"msg":"cmd failed! 未知的cmd命令!"}"#);
    check(resp::<()>(Command::CloseReq, Status::CloseOk, None), r#"{"code":10021,"command":14,"msg":"close ok! 关闭成功"}"#);
    check(
        resp::<()>(Command::GetUserResp, Status::GetUserFailed, None),
        r#"{"code":10004,"command":18,"msg":"get user failed ! 获取用户信息失败!"}"#,
    );
    check(
        resp::<()>(Command::GetMessageResp, Status::GetMessageFailed, None),
        r#"{"code":10015,"command":20,"msg":"get user message failed! 获取用户消息失败!"}"#,
    );
    check(
        resp(Command::AuthResp, Status::AuthOk, Some(json!({"token": "t"}))),
        r#"{"code":10009,"command":4,"data":{"token":"t"},"msg":"ok 鉴权成功!"}"#,
    );
    check(resp::<()>(Command::AuthResp, Status::AuthFailed, None), r#"{"code":10010,"command":4,"msg":"auth failed! 鉴权失败!"}"#);
    check(
        resp::<()>(Command::JoinGroupResp, Status::JoinGroupFailed, None),
        r#"{"code":10012,"command":8,"msg":"join group failed! 加入群组失败!"}"#,
    );
    check(heartbeat_reply(), r#"{"command":13,"data":{"hbbyte":-128}}"#);
    check(handshake_reply(), r#"{"command":2,"data":{"hbyte":-127}}"#);
    check(resp::<()>(Command::ChatResp, Status::SendFailed, None), "{\"code\":10002,\"command\":12,\"msg\":\"send failed 消息发送失败,数据格式不正确,请参考:{'from':来源ID,'to':目标ID,'cmd':'消息命令码','createTime':消息创建时间(Long型),'msgType':Integer消息类型,'content':内容}\"}");
}

#[test]
fn notifications_match_jim_3x_bytes() {
    let user = UserView { avatar: None, nick: Some("Ann".into()), status: "online", user_id: "ann".into() };
    check(
        join_notify("100", &user),
        r#"{"code":10011,"command":9,"group":"100","msg":"join group ok! 加入群组成功!","user":{"nick":"Ann","status":"online","userId":"ann"}}"#,
    );
    let user = UserView { status: "offline", ..user };
    check(exit_notify("100", &user), r#"{"command":10,"data":{"group":"100","user":{"nick":"Ann","status":"offline","userId":"ann"}}}"#);
}

#[test]
fn chat_push_bytes() {
    let body = ChatBody {
        avatar: None,
        chat_type: 2,
        client_id: Some("c1".into()),
        cmd: 11,
        content: "hi".into(),
        create_time: 1700000000000,
        extras: None,
        from: "a".into(),
        group_id: None,
        id: "0190a1b2c3d4e5f60718293a4b5c6d7e".into(),
        msg_type: 0,
        nick: Some("A".into()),
        recalled: false,
        seq: 3,
        to: Some("b".into()),
    };
    check(
        push(Command::ChatReq, &body),
        r#"{"command":11,"data":{"chatType":2,"clientId":"c1","cmd":11,"content":"hi","createTime":1700000000000,"from":"a","id":"0190a1b2c3d4e5f60718293a4b5c6d7e","msgType":0,"nick":"A","seq":3,"to":"b"}}"#,
    );
    let ack = ChatAck { client_id: None, conversation: "p:a:b", id: "x", seq: 3 };
    check(
        resp(Command::ChatResp, Status::Ok, Some(ack)),
        r#"{"code":10000,"command":12,"data":{"conversation":"p:a:b","id":"x","seq":3},"msg":"ok 发送成功"}"#,
    );
}

#[test]
fn user_info_bytes() {
    let info = UserInfo {
        avatar: None,
        friends: vec![],
        groups: vec![GroupView {
            avatar: None,
            group_id: "100".into(),
            name: Some("lobby".into()),
            online: 1,
            users: vec![UserView { avatar: None, nick: Some("ann".into()), status: "online", user_id: "ann".into() }],
        }],
        nick: Some("ann".into()),
        status: "online",
        terminal: Some("ws"),
        user_id: "ann".into(),
    };
    check(
        resp(Command::GetUserResp, Status::GetOnlineUsersOk, Some(info)),
        r#"{"code":10005,"command":18,"data":{"friends":[],"groups":[{"groupId":"100","name":"lobby","online":1,"users":[{"nick":"ann","status":"online","userId":"ann"}]}],"nick":"ann","status":"online","terminal":"ws","userId":"ann"},"msg":"ok 获取所有在线用户信息成功!"}"#,
    );
}

#[test]
fn demo_page_requests_parse() {
    // Exactly what the J-IM 3.x demo page sends (numbers as strings).
    let chat =
        parse_ws(r#"{"from":"u1","to":"u2","cmd":11,"createTime":1700000000000,"chatType":"2","msgType":"0","content":"hello"}"#).unwrap();
    let Request::Chat(chat) = chat else { panic!("not chat") };
    assert_eq!(chat.target, Target::User("u2".into()));
    assert_eq!(chat.content, "hello");
    assert_eq!(chat.msg_type, 0);
    let group =
        parse_ws(r#"{"from":"u1","createTime":1700000000000,"cmd":11,"groupId":"100","chatType":"1","msgType":"0","content":"hi all"}"#)
            .unwrap();
    assert!(matches!(group, Request::Chat(ChatReq { target: Target::Group(ref g), .. }) if g == "100"));
    assert_eq!(
        parse_ws(r#"{"cmd":17,"type":"0","userId":"u1"}"#).unwrap(),
        Request::GetUser { user_id: "u1".into(), filter: UserFilter::Online }
    );
    assert!(matches!(
        parse_ws(r#"{"cmd":19,"type":"0","userId":"u1"}"#).unwrap(),
        Request::GetMessage(MessageQuery { history: false, .. })
    ));
    let history = parse_ws(r#"{"cmd":19,"type":"1","fromUserId":"u2","userId":"u1"}"#).unwrap();
    assert!(matches!(history, Request::GetMessage(MessageQuery { history: true, peer: Some(ref p), .. }) if p == "u2"));
    assert_eq!(parse_ws(r#"{"cmd":13,"hbbyte":"-127"}"#).unwrap(), Request::Heartbeat);
    assert_eq!(parse_ws(r#"{"cmd":3,"token":"校验码"}"#).unwrap(), Request::Auth { token: "校验码".into() });
}

#[test]
fn jim_2x_aliases_and_lenient_types() {
    let req = parse_ws(r#"{"cmd":"11","group_id":"100","chatType":1,"content":"x"}"#).unwrap();
    assert!(matches!(req, Request::Chat(ChatReq { target: Target::Group(ref g), .. }) if g == "100"));
    let login = parse_ws(r#"{"cmd":5,"loginname":"old","password":"p"}"#).unwrap();
    assert!(matches!(login, Request::Login(LoginReq { user_id: Some(ref u), .. }) if u == "old"));
    assert_eq!(parse_ws(r#"{"cmd":17,"userid":"x"}"#).unwrap(), Request::GetUser { user_id: "x".into(), filter: UserFilter::All });
    let times = parse_ws(r#"{"cmd":19,"type":1,"groupId":"g","beginTime":1.7E12,"endTime":"1800000000000","count":"5"}"#).unwrap();
    assert!(matches!(
        times,
        Request::GetMessage(MessageQuery { begin: Some(1_700_000_000_000), end: Some(1_800_000_000_000), count: Some(5), .. })
    ));
}

#[test]
fn keys_match_whatever_their_case_and_underscores_and_other_keys_stay_as_sent() {
    let req = parse_ws(r#"{"CMD":11,"Chat_Type":2,"TO":"b","Content":"x","MSG_TYPE":3,"Größe":"L","Café_Au_Lait":1}"#).unwrap();
    let Request::Chat(chat) = req else { panic!("not chat") };
    assert!(matches!(chat.target, Target::User(ref u) if u == "b"));
    assert_eq!((chat.content.as_str(), chat.msg_type), ("x", 3));
    // Keys that are not chat fields go to extras under the name they were sent with.
    assert_eq!(serde_json::to_string(&chat.extras).unwrap(), r#"{"Café_Au_Lait":1,"Größe":"L"}"#);
}

#[test]
fn of_two_keys_that_match_alike_the_later_one_counts() {
    let req = parse_ws(r#"{"cmd":11,"chatType":2,"to":"a","TO":"b","content":"x"}"#).unwrap();
    assert!(matches!(req, Request::Chat(ChatReq { target: Target::User(ref u), .. }) if u == "b"));
    assert!(parse_ws(r#"[{"cmd":11}]"#).is_err(), "a body that is not an object");
}

#[test]
fn unknown_fields_go_to_extras() {
    let req = parse_ws(r#"{"cmd":11,"chatType":2,"to":"b","content":"x","extras":{"k":1},"color":"red"}"#).unwrap();
    let Request::Chat(chat) = req else { panic!("not chat") };
    assert_eq!(serde_json::to_string(&chat.extras).unwrap(), r#"{"color":"red","k":1}"#);
}

#[test]
fn errors_name_the_right_reply() {
    let unknown = RequestError { command: Command::Unknown, status: Status::UnknownCmd };
    assert_eq!(parse_ws("not json"), Err(unknown));
    assert_eq!(parse_ws(r#"{"nocmd":1}"#), Err(unknown));
    assert_eq!(parse_ws(r#"{"cmd":99}"#), Err(unknown));
    assert_eq!(parse_ws(r#"{"cmd":12}"#), Err(unknown), "a reply code is not a request");
    assert_eq!(parse_ws(r#"{"cmd":16}"#), Err(unknown));
    let chat_fail = RequestError { command: Command::ChatResp, status: Status::SendFailed };
    assert_eq!(parse_ws(r#"{"cmd":11,"to":"b","content":"x"}"#), Err(chat_fail), "chatType is required");
    assert_eq!(parse_ws(r#"{"cmd":11,"chatType":3,"to":"b"}"#), Err(chat_fail));
    assert_eq!(parse_ws(r#"{"cmd":11,"chatType":2}"#), Err(chat_fail), "private needs to");
    assert_eq!(parse_ws(r#"{"cmd":11,"chatType":2,"to":{"x":1}}"#), Err(chat_fail), "wrong type");
    assert_eq!(parse_ws(r#"{"cmd":11,"chatType":2,"to":"a:b"}"#), Err(chat_fail), "':' is not allowed in ids");
    assert_eq!(parse_request(Some(Command::ChatReq), b"{oops"), Err(chat_fail));
    assert_eq!(parse_request(Some(Command::GetMessageResp), b"{}"), Err(unknown));
    assert_eq!(parse_ws(r#"{"cmd":17,"type":0}"#), Err(RequestError { command: Command::GetUserResp, status: Status::GetUserFailed }));
    assert_eq!(
        parse_ws(r#"{"cmd":19,"type":7,"userId":"u"}"#),
        Err(RequestError { command: Command::GetMessageResp, status: Status::GetMessageFailed })
    );
    assert_eq!(parse_ws(r#"{"cmd":3}"#), Err(RequestError { command: Command::AuthResp, status: Status::AuthFailed }));
    assert_eq!(parse_ws(r#"{"cmd":7}"#), Err(RequestError { command: Command::JoinGroupResp, status: Status::JoinGroupFailed }));
    assert_eq!(parse_request(Some(Command::HeartbeatReq), b""), Ok(Request::Heartbeat));
    assert_eq!(parse_request(Some(Command::CloseReq), b""), Ok(Request::Close { user_id: None }));
}

#[test]
fn extensions_parse() {
    assert_eq!(parse_ws(r#"{"cmd":100,"to":"b"}"#).unwrap(), Request::Typing { target: Target::User("b".into()), started: true });
    assert_eq!(parse_ws(r#"{"cmd":101,"groupId":"g"}"#).unwrap(), Request::Typing { target: Target::Group("g".into()), started: false });
    assert_eq!(
        parse_ws(r#"{"cmd":103,"to":"b","seq":"4"}"#).unwrap(),
        Request::Receipt { target: Target::User("b".into()), seq: 4, read: true }
    );
    assert_eq!(
        parse_ws(r#"{"cmd":104,"groupId":"g","seq":10}"#).unwrap(),
        Request::Sync { target: Target::Group("g".into()), after: 10, limit: DEFAULT_PAGE }
    );
    assert_eq!(parse_ws(r#"{"cmd":102,"to":"b"}"#), Err(RequestError { command: Command::DeliveryReceipt, status: Status::BadRequest }));
    assert_eq!(parse_ws(r#"{"cmd":15,"id":"abc"}"#).unwrap(), Request::Recall { id: "abc".into() });
}

proptest::proptest! {
    #[test]
    fn any_bytes_parse_without_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), cmd in 0u8..=110) {
        let _ = parse_request(Command::from_code(i64::from(cmd)), &body);
        let _ = parse_request(None, &body);
    }

    #[test]
    fn mutated_chat_never_panics(content in ".{0,40}", key in "[a-zA-Z_]{1,10}", val in proptest::prelude::any::<i64>()) {
        let body = json!({"cmd": 11, "chatType": 2, "to": "b", "content": content, key: val}).to_string();
        let _ = parse_request(None, body.as_bytes());
    }
}
