//! Token validation, the insecure mode and minting, without a server.

use super::*;
use axum::http::HeaderValue;

fn cfg() -> AuthConfig {
    AuthConfig {
        jwt_secret: "s3cret".into(),
        ..Default::default()
    }
}

fn with_header(name: header::HeaderName, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(name, HeaderValue::from_str(value).unwrap());
    h
}

#[test]
fn token_is_found_in_header_subprotocol_and_allowed_query() {
    let auth = Authenticator::new(&cfg()).unwrap();
    let token = mint(
        &cfg(),
        "alice",
        Duration::from_secs(60),
        Some(Platform::Ios),
    )
    .unwrap();
    let none = HashMap::new();
    let id = auth
        .authenticate_upgrade(
            &with_header(header::AUTHORIZATION, &format!("Bearer {token}")),
            &none,
        )
        .unwrap();
    assert_eq!(
        (id.user.as_str(), id.platform),
        ("alice", Some(Platform::Ios))
    );
    let proto = with_header(
        header::SEC_WEBSOCKET_PROTOCOL,
        &format!("fanout.v1, bearer.{token}"),
    );
    assert_eq!(
        auth.authenticate_upgrade(&proto, &none).unwrap().user,
        "alice"
    );
    let query = HashMap::from([("access_token".to_owned(), token.clone())]);
    assert_eq!(
        auth.authenticate_upgrade(&HeaderMap::new(), &query),
        Err(AuthError::Missing)
    );
    let open = Authenticator::new(&AuthConfig {
        allow_query_token: true,
        ..cfg()
    })
    .unwrap();
    assert_eq!(
        open.authenticate_upgrade(&HeaderMap::new(), &query)
            .unwrap()
            .user,
        "alice"
    );
}

#[test]
fn bad_tokens_are_refused() {
    let auth = Authenticator::new(&cfg()).unwrap();
    assert!(matches!(auth.verify("garbage"), Err(AuthError::Invalid(_))));
    let other = mint(
        &AuthConfig {
            jwt_secret: "other".into(),
            ..cfg()
        },
        "a",
        Duration::from_secs(60),
        None,
    )
    .unwrap();
    assert!(matches!(auth.verify(&other), Err(AuthError::Invalid(_))));
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims {
            sub: "a".into(),
            exp: 1,
            nbf: None,
            platform: None,
            device: None,
            iss: None,
            aud: None,
            iat: None,
            groups: None,
        },
        &EncodingKey::from_secret(b"s3cret"),
    )
    .unwrap();
    assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let strict = AuthConfig {
        issuer: "me".into(),
        audience: "app".into(),
        ..cfg()
    };
    let auth = Authenticator::new(&strict).unwrap();
    assert!(auth
        .verify(&mint(&strict, "a", Duration::from_secs(60), None).unwrap())
        .is_ok());
    assert!(auth
        .verify(&mint(&cfg(), "a", Duration::from_secs(60), None).unwrap())
        .is_err());
}

fn signed(alg: Algorithm, private_pem: &[u8], sub: &str) -> String {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem).unwrap(),
        _ => EncodingKey::from_ec_pem(private_pem).unwrap(),
    };
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let claims = Claims {
        sub: sub.into(),
        exp,
        nbf: None,
        platform: None,
        device: None,
        iss: None,
        aud: None,
        iat: None,
        groups: None,
    };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &key).unwrap()
}

#[test]
fn rs256_and_es256_tokens_verify_with_the_public_key() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let read = |f: &str| std::fs::read(format!("{fixtures}{f}")).unwrap();
    for (alg, private, public) in [
        (Algorithm::RS256, "rsa-private.pem", "rsa-public.pem"),
        (Algorithm::ES256, "ec-private.pem", "ec-public.pem"),
    ] {
        let cfg = AuthConfig {
            jwt_public_key: String::from_utf8(read(public)).unwrap(),
            ..Default::default()
        };
        let auth = Authenticator::new(&cfg).unwrap();
        assert_eq!(
            auth.verify(&signed(alg, &read(private), "kai"))
                .unwrap()
                .user,
            "kai",
            "{alg:?}"
        );
        // An HS256 token is refused when only a public key is configured.
        let hs = mint(
            &AuthConfig {
                jwt_secret: "s".into(),
                ..Default::default()
            },
            "kai",
            Duration::from_secs(60),
            None,
        )
        .unwrap();
        assert!(auth.verify(&hs).is_err(), "{alg:?} config accepted HS256");
    }
    // A token signed by another key pair is refused.
    let rsa_cfg = AuthConfig {
        jwt_public_key: String::from_utf8(read("rsa-public.pem")).unwrap(),
        ..Default::default()
    };
    let es_token = signed(Algorithm::ES256, &read("ec-private.pem"), "kai");
    assert!(Authenticator::new(&rsa_cfg)
        .unwrap()
        .verify(&es_token)
        .is_err());
}

/// An HS256 token with `secret` "s3cret" and these claims.
fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &EncodingKey::from_secret(b"s3cret"),
    )
    .unwrap()
}

#[test]
fn nbf_is_honoured_with_a_small_leeway() {
    let auth = Authenticator::new(&cfg()).unwrap();
    let now = unix_now();
    let at = |nbf: u64| hs256(serde_json::json!({"sub": "a", "exp": now + 7200, "nbf": nbf}));
    assert!(matches!(
        auth.verify(&at(now + 3600)),
        Err(AuthError::NotYetValid { .. })
    ));
    assert_eq!(
        auth.verify(&at(now + 3600)).unwrap_err().code(),
        "token_not_yet_valid"
    );
    assert!(auth.verify(&at(now + NBF_LEEWAY_SECS + 5)).is_err());
    // Clock skew: an issuer a little ahead of us.
    assert!(auth.verify(&at(now + NBF_LEEWAY_SECS / 2)).is_ok());
    assert!(auth.verify(&at(now - 10)).is_ok());
    assert!(matches!(
        auth.verify(&hs256(
            serde_json::json!({"sub": "a", "exp": now + 60, "nbf": "soon"})
        )),
        Err(AuthError::Invalid(_))
    ));
}

#[test]
fn audience_may_be_a_string_or_an_array() {
    let strict = AuthConfig {
        audience: "app".into(),
        ..cfg()
    };
    let auth = Authenticator::new(&strict).unwrap();
    let exp = unix_now() + 60;
    let with =
        |aud: serde_json::Value| hs256(serde_json::json!({"sub": "a", "exp": exp, "aud": aud}));
    assert!(auth.verify(&with("app".into())).is_ok());
    assert!(auth
        .verify(&with(serde_json::json!(["other", "app"])))
        .is_ok());
    assert!(auth.verify(&with(serde_json::json!(["other"]))).is_err());
    assert!(auth.verify(&with("other".into())).is_err());
    // With no audience configured, either shape is accepted as it is.
    let open = Authenticator::new(&cfg()).unwrap();
    assert!(open.verify(&with(serde_json::json!(["x", "y"]))).is_ok());
}

#[test]
fn a_bad_user_id_is_refused_with_400_wherever_it_comes_from() {
    let auth = Authenticator::new(&cfg()).unwrap();
    let exp = unix_now() + 60;
    for sub in ["a\0b".to_owned(), "x".repeat(10 * 1024), String::new()] {
        let token = hs256(serde_json::json!({"sub": sub, "exp": exp}));
        let err = auth.verify(&token).unwrap_err();
        assert_eq!(
            (err.status(), err.code()),
            (StatusCode::BAD_REQUEST, "bad_user_id"),
            "{sub:?}"
        );
    }
    let insecure = Authenticator::new(&AuthConfig {
        mode: AuthMode::Insecure,
        ..cfg()
    })
    .unwrap();
    let query = |u: &str| HashMap::from([("user".to_owned(), u.to_owned())]);
    let err = insecure
        .authenticate_upgrade(&HeaderMap::new(), &query("a\nb"))
        .unwrap_err();
    assert_eq!(err.code(), "bad_user_id");
    assert!(insecure
        .authenticate_upgrade(&HeaderMap::new(), &query("ada"))
        .is_ok());
    assert!(mint(&cfg(), "a\u{0}", Duration::from_secs(60), None).is_err());
}

#[test]
fn admin_token_is_compared_exactly() {
    let auth = Authenticator::new(&AuthConfig {
        admin_token: "adm".into(),
        ..cfg()
    })
    .unwrap();
    assert!(auth.is_admin(&with_header(header::AUTHORIZATION, "Bearer adm")));
    assert!(!auth.is_admin(&with_header(header::AUTHORIZATION, "Bearer adx")));
    assert!(!auth.is_admin(&HeaderMap::new()));
}

#[test]
fn a_revoked_users_older_tokens_are_refused() {
    let auth = Authenticator::new(&cfg()).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let with_iat = |user: &str, iat: Option<i64>| {
        let claims = Claims {
            sub: user.into(),
            exp: now as u64 + 60,
            nbf: None,
            platform: None,
            device: None,
            iss: None,
            aud: None,
            iat,
            groups: None,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap()
    };
    let minted = mint(&cfg(), "alice", Duration::from_secs(60), None).unwrap();
    assert!(
        auth.verify(&minted).unwrap().issued_at.unwrap() >= now,
        "mint sets iat"
    );
    auth.revocations().revoke("alice", now + 1);
    let refused = auth.verify(&minted).unwrap_err();
    assert_eq!(refused, AuthError::Revoked { before: now + 1 });
    assert_eq!(refused.code(), "token_revoked");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(
        auth.verify(&with_iat("alice", None)).is_err(),
        "no iat: refused"
    );
    assert!(auth.verify(&with_iat("alice", Some(now))).is_err());
    assert_eq!(
        auth.verify(&with_iat("alice", Some(now + 1)))
            .unwrap()
            .issued_at,
        Some(now + 1)
    );
    assert!(auth.verify(&with_iat("bob", None)).is_ok(), "bob untouched");
    let headers = with_header(header::AUTHORIZATION, &format!("Bearer {minted}"));
    assert!(matches!(
        auth.may_act_for(&headers, "alice"),
        Err(Denied::Unauthenticated(AuthError::Revoked { .. }))
    ));
}

#[test]
fn groups_come_from_the_claim_or_the_insecure_query_and_are_bounded() {
    let auth = Authenticator::new(&cfg()).unwrap();
    let exp = unix_now() + 60;
    let token =
        hs256(serde_json::json!({"sub": "pc-1", "exp": exp, "groups": ["store-42", "ops"]}));
    assert_eq!(auth.verify(&token).unwrap().groups, ["store-42", "ops"]);
    let token = hs256(serde_json::json!({"sub": "pc-1", "exp": exp}));
    assert!(auth.verify(&token).unwrap().groups.is_empty());
    let many: Vec<String> = (0..=MAX_GROUPS).map(|i| format!("g{i}")).collect();
    for groups in [
        serde_json::json!(many),
        serde_json::json!(["ok", "x".repeat(crate::envelope::MAX_GROUP_BYTES + 1)]),
        serde_json::json!(["a\nb"]),
        serde_json::json!([""]),
    ] {
        let token = hs256(serde_json::json!({"sub": "pc-1", "exp": exp, "groups": groups}));
        let err = auth.verify(&token).unwrap_err();
        assert_eq!(
            (err.status(), err.code()),
            (StatusCode::BAD_REQUEST, "bad_groups"),
            "{groups}"
        );
    }
    let token = hs256(serde_json::json!({"sub": "pc-1", "exp": exp, "groups": "store-42"}));
    assert_eq!(auth.verify(&token).unwrap_err().code(), "invalid_token");
    assert!(auth
        .verify(&hs256(
            serde_json::json!({"sub": "pc-1", "exp": exp, "groups": many[..MAX_GROUPS]})
        ))
        .is_ok());

    let insecure = Authenticator::new(&AuthConfig {
        mode: AuthMode::Insecure,
        ..cfg()
    })
    .unwrap();
    let query = |g: &str| {
        HashMap::from([
            ("user".to_owned(), "pc-1".to_owned()),
            ("groups".to_owned(), g.to_owned()),
        ])
    };
    let id = insecure
        .authenticate_upgrade(&HeaderMap::new(), &query("store-42,ops"))
        .unwrap();
    assert_eq!(id.groups, ["store-42", "ops"]);
    let err = insecure
        .authenticate_upgrade(&HeaderMap::new(), &query(&many.join(",")))
        .unwrap_err();
    assert_eq!(err.code(), "bad_groups");
    assert!(err.to_string().contains("33 groups"), "{err}");
}
