//! The `fanout` command line: configuration errors, `check-config`, `token`.

use std::process::{Command, Output};

fn fanout(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    // Run outside the repository so config/default.toml does not apply.
    cmd.current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run fanout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn invalid_config_exits_non_zero_naming_the_key() {
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[("FANOUT__SERVER__MAX_CONNECTIONS", "lots")],
            "max_connections",
        ),
        (
            &[("FANOUT__HEARTBEAT__INTERVAL", "soon")],
            "heartbeat.interval",
        ),
        (
            &[
                ("FANOUT__REDIS__URL", "redis://x"),
                ("FANOUT__AUTH__MODE", "insecure"),
            ],
            "auth.mode",
        ),
        (&[("FANOUT__REDIS__URL", "redis://x")], "auth.jwt_secret"),
        (
            &[("FANOUT__DATABASE__MAX_CONNECTIONS", "0")],
            "database.max_connections",
        ),
    ];
    for (env, key) in cases {
        let out = fanout(&["serve"], env);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(key),
            "{env:?} should name {key}: {}",
            stderr(&out)
        );
    }
    let dir = std::env::temp_dir().join(format!("fanout-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[server]\nlisten_on = \"x\"\n").unwrap();
    let out = fanout(&["--config", file.to_str().unwrap(), "check-config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("listen_on"), "{}", stderr(&out));
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_masked() {
    let env = [
        ("FANOUT__REDIS__URL", "redis://user:hunter2@127.0.0.1:6379"),
        ("FANOUT__AUTH__JWT_SECRET", "very-secret"),
        (
            "FANOUT__DATABASE__URL",
            "postgres://fanout:pg-pass@db:5432/fanout",
        ),
        ("FANOUT__KAFKA__TOPICS", "a, b"),
        ("FANOUT__DATABASE__MAX_CONNECTIONS", "32"),
    ];
    let out = fanout(&["check-config"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains("very-secret") && !text.contains("hunter2") && !text.contains("pg-pass"),
        "{text}"
    );
    assert!(text.contains("redis://user:***@127.0.0.1:6379"), "{text}");
    assert!(text.contains("max_connections = 32"), "{text}");
    assert!(
        text.contains(
            r#"topics = [
    "a",
    "b",
]"#
        ) || text.contains(r#"topics = ["a", "b"]"#),
        "list values are comma-separated and trimmed: {text}"
    );
}

#[test]
fn token_mints_a_jwt_the_server_accepts() {
    let out = fanout(
        &[
            "token",
            "--user",
            "alice",
            "--ttl",
            "5m",
            "--platform",
            "ios",
        ],
        &[("FANOUT__AUTH__JWT_SECRET", "s")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let cfg = fanout::config::AuthConfig {
        jwt_secret: "s".into(),
        ..Default::default()
    };
    let id = fanout::auth::Authenticator::new(&cfg)
        .unwrap()
        .verify(&token)
        .unwrap();
    assert_eq!(
        (id.user.as_str(), id.platform),
        ("alice", Some(fanout::envelope::Platform::Ios))
    );
    let exp = id.exp.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((now + 290..=now + 300).contains(&exp), "ttl 5m");

    let out = fanout(
        &["token", "--user", "alice"],
        &[
            ("FANOUT__REDIS__URL", "redis://x"),
            ("FANOUT__AUTH__JWT_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----"),
        ],
    );
    assert!(!out.status.success());
}

#[test]
fn types_unknown_from_the_environment_keeps_the_registry() {
    let dir = std::env::temp_dir().join(format!("fanout-cli-types-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("types.toml");
    std::fs::write(&file, include_str!("fixtures/types.toml")).unwrap();
    let out = fanout(
        &["--config", file.to_str().unwrap(), "check-config"],
        &[("FANOUT__TYPES__UNKNOWN", "reject")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("unknown = \"reject\""), "{text}");
    assert!(
        text.contains("name = \"marketing\"") && text.contains("name = \"robot.reply\""),
        "registry kept: {text}"
    );
}
