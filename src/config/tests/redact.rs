//! Redaction: printed configuration and store URLs never show a password, and the
//! printed configuration loads back to the same configuration.

use super::*;
use proptest::prelude::*;

#[test]
fn redact_url_hides_passwords_and_keeps_the_rest() {
    assert_eq!(
        redact_url("postgres://u:secret@h/db"),
        "postgres://u:***@h/db"
    );
    assert_eq!(
        redact_url("postgresql://user:secret@127.0.0.1:5432/db?sslmode=disable"),
        "postgresql://user:***@127.0.0.1:5432/db?sslmode=disable"
    );
    for unchanged in [
        "postgres://u@h/db",
        "postgres://postgres@127.0.0.1:5432/test",
        "host=h user=u dbname=db",
    ] {
        assert_eq!(redact_url(unchanged), unchanged);
    }
    assert_eq!(
        redact_url("host=h password=secret user=u"),
        "host=h password=*** user=u"
    );
    assert_eq!(
        redact_url("host=h PASSWORD=secret user=u"),
        "host=h PASSWORD=*** user=u"
    );
}

#[test]
fn printed_configuration_never_shows_the_password() {
    for url in [
        "postgres://u:hunter2hunter2@127.0.0.1:5432/db",
        "host=127.0.0.1 password=hunter2hunter2 user=u",
    ] {
        let config = Config::load_with_env(
            None,
            &Overrides {
                store_kind: Some(StoreKind::Postgres),
                store_url: Some(url.into()),
                ..Overrides::default()
            },
            Vec::new(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.store.url.as_deref(), Some(url), "kept for use");
        let printed = config.to_redacted_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("***"), "{printed}");
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }
}

#[test]
fn printed_configuration_loads_back_to_the_same_configuration() {
    let config = load_toml(
        r#"
            [node]
            id = "node-1"
            role = "observer"

            [store]
            kind = "postgres"
            url = "postgres://u@127.0.0.1:5432/db"
            schema = "w"
            pool_size = 3
            connect_timeout = "1s 500ms"

            [[subscriptions]]
            group = "billing"
            sources = ["category:orders", "stream:orders/o-1", "log"]
            instances = 2
        "#,
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.store.connect_timeout, Duration::from_millis(1500));
    let printed = config.to_redacted_toml();
    let reloaded = load_toml(&printed, &[]).unwrap_or_else(|e| panic!("{e}\n{printed}"));
    assert_eq!(reloaded, config, "{printed}");
}

proptest! {
    #[test]
    fn redacted_urls_never_contain_the_password(
        password in "[A-Za-z0-9]{10,20}",
        form in 0usize..3,
    ) {
        let url = match form {
            0 => format!("postgres://user:{password}@db.example:5432/weir"),
            1 => format!("postgresql://user:{password}@10.0.0.1/weir?sslmode=disable"),
            _ => format!("host=db.example port=5432 password={password} user=user"),
        };
        let redacted = redact_url(&url);
        prop_assert!(!redacted.contains(&password), "{}", redacted);
        prop_assert!(redacted.contains("user"), "{}", redacted);
    }
}

#[test]
fn redact_url_hides_passwords_in_every_form_postgres_accepts() {
    for url in [
        "postgres://u:hunter2@h1:5432,h2:5433/db",
        "postgres://u@h/db?password=hunter2",
        "host=h password = hunter2 user=u",
        "host=h password='hunter2 hunter2' user=u",
        "postgres://u:hunter2@h:badport/db",
    ] {
        let redacted = redact_url(url);
        assert!(!redacted.contains("hunter2"), "{url:?} -> {redacted:?}");
    }
}
