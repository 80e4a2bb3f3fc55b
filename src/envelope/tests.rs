//! Unit tests of envelope decoding and the `msg` frame rendering.

use super::*;

fn ok(json: &str) -> Envelope {
    decode(Some(json.as_bytes()), 1 << 20).unwrap()
}

fn reason(json: &str) -> &'static str {
    decode(Some(json.as_bytes()), 1 << 20).unwrap_err().as_str()
}

#[test]
fn decodes_every_target_shape() {
    let e = ok(r#"{"type":"robot.reply","to":{"user":"alice"},"data":{"text":"hi"}}"#);
    assert_eq!(e.msg_type, "robot.reply");
    assert_eq!(e.data.get(), r#"{"text":"hi"}"#);
    assert!(
        matches!(e.to, Target::User { ref user, platform: None, tab: None } if user == "alice")
    );
    let e = ok(r#"{"type":"x","to":{"user":"a","platform":"ios"}}"#);
    assert!(matches!(
        e.to,
        Target::User {
            platform: Some(Platform::Ios),
            ..
        }
    ));
    let e = ok(r#"{"type":"x","to":{"user":"a","tab":"t-1"}}"#);
    assert!(matches!(e.to, Target::User { tab: Some(ref t), .. } if t == "t-1"));
    assert_eq!(
        ok(r#"{"type":"x","to":{"users":["a","b"]}}"#).to,
        Target::Users(vec!["a".into(), "b".into()])
    );
    assert_eq!(
        ok(r#"{"type":"x","to":{"conn":"c-1"}}"#).to,
        Target::Conn("c-1".into())
    );
    assert_eq!(ok(r#"{"type":"x","to":{"all":true}}"#).to, Target::All);
    assert_eq!(
        ok(r#"{"type":"x","to":{"group":"store-42"}}"#).to,
        Target::Group("store-42".into())
    );
}

#[test]
fn groups_take_one_selector_and_a_valid_name() {
    let long = "g".repeat(MAX_GROUP_BYTES + 1);
    for json in [
        r#"{"type":"x","to":{"group":""}}"#.to_owned(),
        r#"{"type":"x","to":{"group":5}}"#.to_owned(),
        r#"{"type":"x","to":{"group":"a\u0000b"}}"#.to_owned(),
        r#"{"type":"x","to":{"group":"a\nb"}}"#.to_owned(),
        r#"{"type":"x","to":{"group":"g","user":"a"}}"#.to_owned(),
        r#"{"type":"x","to":{"group":"g","all":true}}"#.to_owned(),
        r#"{"type":"x","to":{"group":"g","platform":"ios"}}"#.to_owned(),
        r#"{"type":"x","to":{"group":"g","tab":"t"}}"#.to_owned(),
        format!(r#"{{"type":"x","to":{{"group":"{long}"}}}}"#),
    ] {
        let err = decode(Some(json.as_bytes()), 1 << 20).unwrap_err();
        assert_eq!(err.as_str(), "bad_target", "{json}");
    }
    ok(&format!(
        r#"{{"type":"x","to":{{"group":"{}"}}}}"#,
        &long[1..]
    ));
    assert!(check_group("store 42/ü").is_ok());
    assert_eq!(Target::Group("g".into()).kafka_key(), Some("g"));
    assert_eq!(Target::Users(vec!["a".into()]).kafka_key(), Some("a"));
    assert_eq!(Target::All.kafka_key(), None);
}

#[test]
fn collapse_is_a_bounded_string() {
    let e = ok(r#"{"type":"x","to":{"group":"g"},"collapse":"job-7"}"#);
    assert_eq!(e.collapse.as_deref(), Some("job-7"));
    assert_eq!(ok(r#"{"type":"x","to":{"all":true}}"#).collapse, None);
    let long = "k".repeat(MAX_COLLAPSE_BYTES + 1);
    for json in [
        r#"{"type":"x","to":{"all":true},"collapse":5}"#.to_owned(),
        r#"{"type":"x","to":{"all":true},"collapse":""}"#.to_owned(),
        r#"{"type":"x","to":{"all":true},"collapse":{"k":1}}"#.to_owned(),
        r#"{"type":"x","to":{"all":true},"collapse":"a\u0007"}"#.to_owned(),
        format!(r#"{{"type":"x","to":{{"all":true}},"collapse":"{long}"}}"#),
    ] {
        let err = decode(Some(json.as_bytes()), 1 << 20).unwrap_err();
        assert_eq!(err.as_str(), "invalid", "{json}");
    }
}

#[test]
fn msg_frame_carries_collapse_only_when_present() {
    let data = RawValue::from_string("1".into()).unwrap();
    assert_eq!(
        render_msg_frame_with("m", "t", 5, &data, Some("job \"7\"")),
        r#"{"t":"msg","id":"m","type":"t","ts":5,"data":1,"collapse":"job \"7\""}"#
    );
    assert_eq!(
        render_msg_frame_with("m", "t", 5, &data, None),
        r#"{"t":"msg","id":"m","type":"t","ts":5,"data":1}"#
    );
}

#[test]
fn missing_data_is_null_and_extras_are_kept() {
    let e = ok(r#"{"type":"x","to":{"all":true},"id":"p-1","ttl_ms":5000}"#);
    assert_eq!(e.data.get(), "null");
    assert!(
        matches!(
            decode(Some(br#"{"type":"x","to":{"all":true},"id":5}"#), 1000),
            Err(Reject::Invalid(_))
        ),
        "a producer id is a string"
    );
    assert_eq!(e.ttl_ms, Some(5000));
}

#[test]
fn rejects_bad_records_with_a_reason() {
    assert_eq!(decode(None, 10).unwrap_err(), Reject::Empty);
    assert_eq!(decode(Some(b"{}"), 1).unwrap_err().as_str(), "too_large");
    assert_eq!(reason("not json"), "not_json");
    assert_eq!(reason(r#"{"type":"x","to":{"all":true}"#), "not_json");
    assert_eq!(reason("[1,2]"), "invalid");
    assert_eq!(reason(r#"{"type":5,"to":{"all":true}}"#), "invalid");
    assert_eq!(reason(r#"{"to":{"all":true}}"#), "no_type");
    assert_eq!(reason(r#"{"type":"","to":{"all":true}}"#), "no_type");
    assert_eq!(reason(r#"{"type":"x"}"#), "bad_target");
    assert_eq!(reason(r#"{"type":"x","to":{}}"#), "bad_target");
    assert_eq!(
        reason(r#"{"type":"x","to":{"user":"a","all":true}}"#),
        "bad_target"
    );
    assert_eq!(reason(r#"{"type":"x","to":{"all":false}}"#), "bad_target");
    assert_eq!(reason(r#"{"type":"x","to":{"users":[]}}"#), "bad_target");
    assert_eq!(
        reason(r#"{"type":"x","to":{"conn":"c","tab":"t"}}"#),
        "bad_target"
    );
    assert_eq!(
        reason(r#"{"type":"x","to":{"user":"a","platform":"desktop"}}"#),
        "bad_target"
    );
    assert_eq!(reason(r#"{"type":"x","to":{"usr":"a"}}"#), "bad_target");
}

#[test]
fn user_ids_follow_the_one_rule() {
    let long = "u".repeat(crate::user_id::MAX_USER_ID_BYTES + 1);
    for json in [
        r#"{"type":"x","to":{"user":""}}"#.to_owned(),
        r#"{"type":"x","to":{"user":"a\u0000b"}}"#.to_owned(),
        r#"{"type":"x","to":{"users":["a","b\nc"]}}"#.to_owned(),
        r#"{"type":"x","to":{"users":["a",""]}}"#.to_owned(),
        format!(r#"{{"type":"x","to":{{"user":"{long}"}}}}"#),
        format!(r#"{{"type":"x","to":{{"users":["{long}"]}}}}"#),
    ] {
        let err = decode(Some(json.as_bytes()), 1 << 20).unwrap_err();
        assert_eq!(err.as_str(), "bad_target", "{json}");
    }
    let err = decode(Some(br#"{"type":"x","to":{"user":"a\u0000"}}"#), 1 << 20).unwrap_err();
    assert!(err.to_string().contains("U+0000"), "{err}");
    ok(&format!(
        r#"{{"type":"x","to":{{"user":"{}"}}}}"#,
        &long[1..]
    ));
}

#[test]
fn a_user_listed_twice_is_one_recipient() {
    let e = ok(r#"{"type":"x","to":{"users":["b","a","b"]}}"#);
    assert_eq!(e.to, Target::Users(vec!["a".into(), "b".into()]));
}

#[test]
fn target_round_trips_through_json() {
    for t in [
        Target::User {
            user: "a".into(),
            platform: Some(Platform::H5),
            tab: Some("t".into()),
        },
        Target::Users(vec!["a".into()]),
        Target::Conn("c-9".into()),
        Target::Group("store-42".into()),
        Target::All,
    ] {
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Target>(&json).unwrap(), t, "{json}");
    }
}

#[test]
fn msg_frame_carries_data_verbatim() {
    let data = RawValue::from_string(r#"{"text":"hi \"there\"","n":[1,2]}"#.into()).unwrap();
    let frame = render_msg_frame("m-1", "robot.reply", 1764000000000, &data);
    assert_eq!(
        frame,
        r#"{"t":"msg","id":"m-1","type":"robot.reply","ts":1764000000000,"data":{"text":"hi \"there\"","n":[1,2]}}"#
    );
}
