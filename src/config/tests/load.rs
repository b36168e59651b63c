//! Loading: each layer beats the one below, the `WEIR_*` environment (misspelled
//! variables too), unknown keys, unreadable files, and how problems are keyed.

use super::*;

#[test]
fn broker_settings_layer_like_every_section() {
    let config = load_toml(
        "[broker]\nheartbeat_interval = \"1s\"\n",
        &[("WEIR_BROKER__LEASE_TTL", "30s")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.broker.heartbeat_interval, Duration::from_secs(1));
    assert_eq!(config.broker.lease_ttl, Duration::from_secs(30));
    assert_eq!(
        config.broker.member_timeout,
        BrokerSettings::default().member_timeout
    );
    let error = load_err(
        "[broker]\nheartbeat_interval = \"5s\"\n",
        &[("WEIR_BROKER__HANDOVER_TIMEOUT", "0s")],
    );
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["broker.handover_timeout", "broker.member_timeout"]);
}

#[test]
fn embedded_default_loads_to_the_rust_defaults() {
    let loaded = Config::load_with_env(None, &Overrides::default(), Vec::new())
        .expect("the embedded default is valid");
    assert_eq!(without_node_id(loaded), Config::default());

    // The file agrees with the Rust defaults on its own, not only because the
    // defaults layer lies beneath it.
    let parsed: Config = toml::from_str(EMBEDDED_DEFAULT).expect("the embedded default parses");
    assert_eq!(without_node_id(parsed), Config::default());
    assert_eq!(Config::default().store.kind, StoreKind::Memory);
    assert_eq!(Config::default().bus.kind, BusKind::Memory);
    assert!(Config::default().validate().is_empty());
}

#[test]
fn each_layer_beats_the_one_below_on_the_same_key() {
    let dir = TempDir::new();
    let file = dir.file(
        "weir.toml",
        r#"
            [node]
            id = "file-node"
            role = "observer"

            [store]
            kind = "postgres"
            url = "postgres://file@127.0.0.1:5432/file"
            schema = "from_file"
            pool_size = 4

            [http]
            listen = "127.0.0.1:1001"
        "#,
    );
    let environment = env(&[
        ("WEIR_NODE__ID", "env-node"),
        ("WEIR_NODE__ROLE", "coordinator"),
        ("WEIR_STORE__URL", "postgres://env@127.0.0.1:5432/env"),
        ("WEIR_STORE__SCHEMA", "from_env"),
        ("WEIR_STORE__POOL_SIZE", "8"),
        ("WEIR_HTTP__LISTEN", "127.0.0.1:1002"),
    ]);
    let overrides = Overrides {
        node_id: Some("cli-node".into()),
        role: Some(BrokerRole::Full),
        store_kind: Some(StoreKind::Postgres),
        store_url: Some("postgres://cli@127.0.0.1:5432/cli".into()),
        schema: Some("from_cli".into()),
        listen: Some("127.0.0.1:1003".into()),
    };

    // Defaults alone (through the embedded default).
    let defaults = Config::load_with_env(None, &Overrides::default(), Vec::new()).unwrap();
    assert_eq!(defaults.store.schema, "weir");
    assert_eq!(defaults.http.listen, "127.0.0.1:9600");
    assert_eq!(defaults.node.role, BrokerRole::Full);

    // The file beats the defaults.
    let from_file = Config::load_with_env(Some(&file), &Overrides::default(), Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(from_file.node.id.as_deref(), Some("file-node"));
    assert_eq!(from_file.node.role, BrokerRole::Observer);
    assert_eq!(from_file.store.kind, StoreKind::Postgres);
    assert_eq!(
        from_file.store.url.as_deref(),
        Some("postgres://file@127.0.0.1:5432/file")
    );
    assert_eq!(from_file.store.schema, "from_file");
    assert_eq!(from_file.store.pool_size, 4);
    assert_eq!(from_file.http.listen, "127.0.0.1:1001");
    // Keys the file leaves out keep their defaults.
    assert_eq!(from_file.store.connect_timeout, Duration::from_secs(5));

    // The environment beats the file.
    let from_env = Config::load_with_env(Some(&file), &Overrides::default(), environment.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(from_env.node.id.as_deref(), Some("env-node"));
    assert_eq!(from_env.node.role, BrokerRole::Coordinator);
    assert_eq!(
        from_env.store.url.as_deref(),
        Some("postgres://env@127.0.0.1:5432/env")
    );
    assert_eq!(from_env.store.schema, "from_env");
    assert_eq!(from_env.store.pool_size, 8);
    assert_eq!(from_env.http.listen, "127.0.0.1:1002");

    // The command line beats the environment; what it does not set stays as the
    // environment had it.
    let from_cli = Config::load_with_env(Some(&file), &overrides, environment)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(from_cli.node.id.as_deref(), Some("cli-node"));
    assert_eq!(from_cli.node.role, BrokerRole::Full);
    assert_eq!(from_cli.store.kind, StoreKind::Postgres);
    assert_eq!(
        from_cli.store.url.as_deref(),
        Some("postgres://cli@127.0.0.1:5432/cli")
    );
    assert_eq!(from_cli.store.schema, "from_cli");
    assert_eq!(from_cli.store.pool_size, 8);
    assert_eq!(from_cli.http.listen, "127.0.0.1:1003");
}

#[test]
fn overrides_beat_the_embedded_default_and_the_environment_on_store_kind() {
    // The embedded default says memory; the environment says postgres; the flag
    // says memory again, and the url from the environment then is a problem.
    let environment = env(&[
        ("WEIR_STORE__KIND", "postgres"),
        ("WEIR_STORE__URL", "postgres://env@127.0.0.1:5432/env"),
    ]);
    let from_env = Config::load_with_env(None, &Overrides::default(), environment.clone()).unwrap();
    assert_eq!(from_env.store.kind, StoreKind::Postgres);
    let overrides = Overrides {
        store_kind: Some(StoreKind::Memory),
        ..Overrides::default()
    };
    let error = Config::load_with_env(None, &overrides, environment).unwrap_err();
    assert_eq!(keys(&error), ["store.url"]);
    assert!(problem(&error, "store.url").message.contains("memory"));
}

#[test]
fn durations_are_written_in_human_form() {
    let config = load_toml("[store]\nconnect_timeout = \"500ms\"\n", &[]).unwrap();
    assert_eq!(config.store.connect_timeout, Duration::from_millis(500));
    let config = load_toml("[store]\nconnect_timeout = \"10s\"\n", &[]).unwrap();
    assert_eq!(config.store.connect_timeout, Duration::from_secs(10));
    let config = load_toml(
        "[store]\nconnect_timeout = \"10s\"\n",
        &[("WEIR_STORE__CONNECT_TIMEOUT", "2m")],
    )
    .unwrap();
    assert_eq!(config.store.connect_timeout, Duration::from_secs(120));

    let error = load_err("[store]\nconnect_timeout = \"soon\"\n", &[]);
    assert_eq!(error.problems.len(), 1, "{error}");
    let soon = problem(&error, "store.connect_timeout");
    assert!(soon.message.contains("soon"), "{soon}");
    assert!(soon.message.contains("duration"), "{soon}");

    let error = load_err("[store]\nconnect_timeout = \"0s\"\n", &[]);
    assert!(
        problem(&error, "store.connect_timeout")
            .message
            .contains("longer than 0s")
    );
}

#[test]
fn unknown_keys_and_sections_are_problems_naming_the_key() {
    let error = load_err(
        "verbose = true\n[store]\ncolour = \"blue\"\n[stroe]\nkind = \"memory\"\n",
        &[],
    );
    let colour = problem(&error, "store.colour");
    assert!(colour.message.contains("colour"), "{colour}");
    assert!(problem(&error, "stroe").message.contains("unknown section"));
    assert!(
        problem(&error, "verbose")
            .message
            .contains("unknown section")
    );
    assert_eq!(error.problems.len(), 3, "{error}");

    // The same through the environment: a well-formed name with an unknown key.
    let error = load_err("", &[("WEIR_HTTP__PORT", "9600")]);
    let port = problem(&error, "http.port");
    assert!(port.message.contains("port"), "{port}");
}

#[test]
fn misspelled_env_vars_suggest_the_double_underscore() {
    let error = load_err(
        "",
        &[
            ("WEIR_STORE_URL", "postgres://u@h/db"),
            ("WEIR_STORE_CONNECT_TIMEOUT", "1s"),
            ("WEIR_HTTP_LISTEN", "127.0.0.1:1"),
        ],
    );
    assert_eq!(
        keys(&error),
        [
            "WEIR_STORE_URL",
            "WEIR_STORE_CONNECT_TIMEOUT",
            "WEIR_HTTP_LISTEN"
        ]
    );
    assert!(
        problem(&error, "WEIR_STORE_URL")
            .message
            .contains("WEIR_STORE__URL")
    );
    assert!(
        problem(&error, "WEIR_STORE_CONNECT_TIMEOUT")
            .message
            .contains("WEIR_STORE__CONNECT_TIMEOUT")
    );
    assert!(
        problem(&error, "WEIR_HTTP_LISTEN")
            .message
            .contains("WEIR_HTTP__LISTEN")
    );
}

#[test]
fn unrelated_env_vars_are_ignored() {
    let environment = env(&[
        (
            "WEIR_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        ),
        ("WEIR_REQUIRE_SERVICES", "1"),
        ("WEIR_CONFIG", "/nonexistent/weir.toml"),
        ("WEIR_LOG", "debug"),
        ("WEIR_", "x"),
        ("WEIR", "x"),
        ("STORE__URL", "postgres://not-weir@h/db"),
        ("weir_store__url", "postgres://lowercase@h/db"),
        ("PATH", "/usr/bin"),
    ]);
    let config = Config::load_with_env(None, &Overrides::default(), environment)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(without_node_id(config), Config::default());
}

#[test]
fn a_missing_config_file_is_a_problem() {
    let dir = TempDir::new();
    let missing = dir.0.join("missing.toml");
    let error =
        Config::load_with_env(Some(&missing), &Overrides::default(), Vec::new()).unwrap_err();
    let problem = problem(&error, "config");
    assert!(problem.message.contains("does not exist"), "{problem}");
    assert!(
        problem.message.contains(&missing.display().to_string()),
        "{problem}"
    );
}

#[test]
fn deserialisation_problems_are_keyed_section_first() {
    let error = load_err("[store]\nconnect_timeout = \"soon\"\n", &[]);
    assert_eq!(keys(&error), ["store.connect_timeout"]);
    let error = load_err("[store]\ncolour = \"blue\"\n", &[]);
    assert!(
        keys(&error)
            .iter()
            .all(|k| *k == "store" || *k == "store.colour"),
        "{error}"
    );
    let error = load_err(
        "[[subscriptions]]\ngroup = \"g\"\nsources = [\"bogus\"]\n",
        &[],
    );
    assert_eq!(keys(&error), ["subscriptions[0].sources[0]"]);
}

#[test]
fn an_unreadable_file_is_reported_once() {
    let dir = TempDir::new();
    let missing = dir.0.join("missing.toml");
    let error =
        Config::load_with_env(Some(&missing), &Overrides::default(), Vec::new()).unwrap_err();
    assert_eq!(keys(&error), ["config"], "{error}");
    let error = load_err("[store\n", &[]);
    assert_eq!(error.problems.len(), 1, "{error}");
}

#[test]
fn env_values_that_look_like_numbers_can_set_string_keys() {
    let config = load_toml("", &[("WEIR_NODE__ID", "42")]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.node.id.as_deref(), Some("42"));
}
