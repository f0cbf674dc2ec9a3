#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
use super::*;
use proptest::prelude::*;

fn bytes(b: &[u8]) -> BytesMut {
    BytesMut::from(b)
}

#[test]
fn decodes_the_documented_login_example() {
    let body = br#"{"cmd":5,"password":"123","userId":"hello_client"}"#;
    assert_eq!(body.len(), 0x32);
    let mut wire = vec![0x01, 0xD1, 0x05, 0x00, 0x00, 0x00, 0x32];
    wire.extend_from_slice(body);
    let mut buf = bytes(&wire);
    let frame = decode(&mut buf, MAX_BODY).unwrap().unwrap();
    assert_eq!(frame.cmd, Command::LoginReq);
    assert_eq!(frame.syn_seq, None);
    assert_eq!(&frame.body[..], body);
    assert!(buf.is_empty());
}

#[test]
fn encodes_with_jim_output_mask() {
    let mut out = BytesMut::new();
    encode(12, 0, br#"{"code":10000}"#, &mut out);
    assert_eq!(&out[..7], &[0x01, 0xD1, 0x0C, 0, 0, 0, 14]);
    let mut out = BytesMut::new();
    encode(12, 7, b"{}", &mut out);
    assert_eq!(&out[..], &[0x01, 0xF1, 0, 0, 0, 7, 0x0C, 0, 0, 0, 2, b'{', b'}']);
}

#[test]
fn reads_syn_seq_and_waits_for_half_frames() {
    let wire = encode_request(13, Some(42), b"{\"cmd\":13}");
    for cut in 0..wire.len() {
        let mut buf = bytes(&wire[..cut]);
        assert_eq!(decode(&mut buf, MAX_BODY), Ok(None), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed");
    }
    let mut buf = bytes(&wire);
    let frame = decode(&mut buf, MAX_BODY).unwrap().unwrap();
    assert_eq!(frame.syn_seq, Some(42));
    assert_eq!(frame.cmd, Command::HeartbeatReq);
}

#[test]
fn header_errors() {
    assert_eq!(decode(&mut bytes(&[0x02]), MAX_BODY), Err(FrameError::BadVersion(2)));
    assert_eq!(decode(&mut bytes(&[1, 0, 77]), MAX_BODY), Err(FrameError::UnknownCmd(77)));
    assert_eq!(decode(&mut bytes(&[1, 0, 11, 0xFF, 0xFF, 0xFF, 0xFF]), MAX_BODY), Err(FrameError::NegativeLength(-1)));
    let over = (MAX_BODY as i32 + 1).to_be_bytes();
    let mut wire = vec![1, 0, 11];
    wire.extend_from_slice(&over);
    assert_eq!(decode(&mut bytes(&wire), MAX_BODY), Err(FrameError::TooLarge(MAX_BODY + 1)));
    assert_eq!(FrameError::BadVersion(2).status().code(), 10013);
    assert_eq!(FrameError::UnknownCmd(77).status().code(), 10014);
}

#[test]
fn two_frames_in_one_buffer() {
    let mut wire = encode_request(13, None, b"{}");
    wire.extend(encode_request(14, None, b"{}"));
    let mut buf = bytes(&wire);
    assert_eq!(decode(&mut buf, MAX_BODY).unwrap().unwrap().cmd, Command::HeartbeatReq);
    assert_eq!(decode(&mut buf, MAX_BODY).unwrap().unwrap().cmd, Command::CloseReq);
    assert_eq!(decode(&mut buf, MAX_BODY), Ok(None));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut buf = bytes(&data);
        let _ = decode(&mut buf, 1024);
    }

    #[test]
    fn round_trip(cmd in prop::sample::select(Command::ALL.to_vec()), syn in 0i32..1000, body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut out = BytesMut::new();
        encode(cmd.code(), syn, &body, &mut out);
        let frame = decode(&mut out, MAX_BODY).unwrap().unwrap();
        prop_assert_eq!(frame.cmd, cmd);
        prop_assert_eq!(frame.syn_seq, (syn > 0).then_some(syn));
        prop_assert_eq!(&frame.body[..], &body[..]);
    }
}
