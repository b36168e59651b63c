//! Validation: every problem is reported at once, at its key path, for every section.

use super::*;
use crate::config::validate::check_template;

#[test]
fn sinks_bus_connections_and_tags_are_read_and_checked() {
    let config = load_ok(
        r#"
            [node]
            tags = ["bridge"]

            [bus]
            kind = "kafka"
            namespace = "fleet-a"

            [nats]
            url = "nats://10.0.0.1:4222, tls://10.0.0.2:4222"
            user = "weir"
            password = "hunter2"

            [kafka]
            brokers = "10.0.0.1:9092"
            partitions = 3
            properties = { "sasl.password" = "s3cret", "security.protocol" = "SASL_SSL" }

            [[subscriptions]]
            group = "bridge"
            sources = ["category:orders"]
            required_tags = ["bridge"]
            sink = { kind = "nats", subject = "events.{category}.{stream}", stream = "EVENTS" }

            [[subscriptions]]
            group = "to-kafka"
            sources = ["log"]
            sink = { kind = "kafka", topic = "events.{category}" }
        "#,
        &[],
    );
    assert_eq!(
        config.subscriptions[0].required_tags,
        ["bridge".to_owned()].into()
    );
    assert_eq!(
        config.subscriptions[0].sink,
        SinkConfig::Nats {
            subject: "events.{category}.{stream}".into(),
            stream: Some("EVENTS".into()),
            max_in_flight: crate::sink::default_max_in_flight(),
            format: crate::sink::Format::Weir,
            cloudevents_source: None,
        }
    );
    assert_eq!(
        config.subscriptions[1].sink,
        SinkConfig::kafka("events.{category}")
    );
    let printed = config.to_redacted_toml();
    assert!(
        !printed.contains("hunter2") && !printed.contains("s3cret"),
        "{printed}"
    );
    assert!(printed.contains("SASL_SSL"), "{printed}");
    let debug = format!("{:?} {:?}", config.nats, config.kafka);
    assert!(
        !debug.contains("hunter2") && !debug.contains("s3cret"),
        "{debug}"
    );

    let error = load_err(
        r#"
            [node]
            tags = ["no spaces"]

            [nats]
            url = "http://localhost"
            user = "weir"
            nkey_seed = "UABC"

            [kafka]
            brokers = "localhost"
            replication = 0

            [demo]
            rate = 0

            [[subscriptions]]
            group = "a"
            sources = ["log"]
            sink = { kind = "nats", subject = "events.{categroy}", max_in_flight = 0 }

            [[subscriptions]]
            group = "b"
            sources = ["log"]
            sink = { kind = "kafka", topic = "events/{category}" }
        "#,
        &[],
    );
    let mut found = keys(&error);
    found.sort_unstable();
    found.dedup();
    assert_eq!(
        found,
        [
            "demo.rate",
            "kafka.brokers",
            "kafka.replication",
            "nats.nkey_seed",
            "nats.password",
            "nats.url",
            "nats.user",
            "node.tags",
            "subscriptions[0].sink.max_in_flight",
            "subscriptions[0].sink.subject",
            "subscriptions[1].sink.topic",
        ],
        "{error}"
    );
    assert!(
        problem(&error, "subscriptions[0].sink.subject")
            .message
            .contains("{category}")
    );
}

#[test]
fn nats_replicas_default_to_one_and_are_checked_by_name() {
    assert_eq!(load_ok("", &[]).nats.replicas, 1);
    let three = load_ok("[nats]\nreplicas = 3", &[]);
    assert_eq!(three.nats.replicas, 3);
    assert_eq!(
        load_ok("", &[("WEIR_NATS__REPLICAS", "5")]).nats.replicas,
        5
    );
    for wrong in [0, 6] {
        let error = load_err(&format!("[nats]\nreplicas = {wrong}"), &[]);
        assert_eq!(keys(&error), ["nats.replicas"], "{error}");
        let message = &problem(&error, "nats.replicas").message;
        assert!(
            message.contains(&format!("{wrong} is out of range: use 1 to 5")),
            "{message}"
        );
    }
}

#[test]
fn templates_accept_known_placeholders_only() {
    let subject = |c: char| !c.is_whitespace() && c != '*' && c != '>';
    assert!(check_template("events.{category}.{stream}.{name}", subject).is_ok());
    assert!(check_template("events.{category", subject).is_err());
    assert!(check_template("events.}", subject).is_err());
    assert!(check_template("events.*", subject).is_err());
    assert!(check_template("", subject).is_err());
}

#[test]
fn log_settings_are_read_and_checked() {
    let config = load_ok(
        "[log]\nlevel = \"warn,weir=debug\"\nformat = \"json\"\n",
        &[],
    );
    assert_eq!(config.log.level, "warn,weir=debug");
    assert_eq!(config.log.format, LogFormat::Json);
    let from_env = load_ok("", &[("WEIR_LOG__FORMAT", "json")]);
    assert_eq!(from_env.log.format, LogFormat::Json);

    let error = load_err("[log]\nlevel = \"[\"\nformat = \"xml\"\n", &[]);
    let mut found = keys(&error);
    found.sort_unstable();
    assert_eq!(found, ["log.format"], "{error}");
    let error = load_err("[log]\nlevel = \"info,[\"\n", &[]);
    assert_eq!(keys(&error), ["log.level"], "{error}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let error = load_err(
        r#"
            [store]
            kind = "postgres"
            schema = "Bad-Schema"
            pool_size = 0

            [bus]
            kind = "nats"
            namespace = "a.b"

            [http]
            listen = "nope"

            [[subscriptions]]
            group = "billing"
            sources = []

            [[subscriptions]]
            group = "billing"
            sources = ["log"]
            instances = 0
        "#,
        &[("WEIR_STORE_URL", "postgres://misspelled@127.0.0.1/db")],
    );
    let mut found = keys(&error);
    found.sort_unstable();
    assert_eq!(
        found,
        [
            "WEIR_STORE_URL",
            "bus.namespace",
            "http.listen",
            "store.pool_size",
            "store.schema",
            "store.url",
            "subscriptions[0].sources",
            "subscriptions[1].group",
            "subscriptions[1].instances",
        ],
        "{error}"
    );
    assert!(problem(&error, "store.url").message.contains("required"));
    assert!(
        problem(&error, "store.schema")
            .message
            .contains("Bad-Schema")
    );
    assert!(
        problem(&error, "store.pool_size")
            .message
            .contains("1 to 1000")
    );
    assert!(problem(&error, "http.listen").message.contains("\"nope\""));
    assert!(
        problem(&error, "subscriptions[0].sources")
            .message
            .contains("at least one source")
    );
    assert!(
        problem(&error, "subscriptions[1].group")
            .message
            .contains("twice")
    );
    let shown = error.to_string();
    for key in keys(&error) {
        assert!(shown.contains(key), "{key} missing from:\n{shown}");
    }
}

#[test]
fn schema_names_are_simple_identifiers() {
    for good in ["weir", "_w", "weir_cli_0123456789ab", &"a".repeat(48)] {
        let config = load_toml(&format!("[store]\nschema = {good:?}\n"), &[]);
        assert!(config.is_ok(), "{good:?}: {}", config.unwrap_err());
    }
    for bad in [
        "",
        "Weir",
        "1weir",
        "we-ir",
        "we ir",
        "weir\"",
        &"a".repeat(49),
    ] {
        let error = load_err(&format!("[store]\nschema = {bad:?}\n"), &[]);
        assert_eq!(keys(&error), ["store.schema"], "{bad:?}");
    }
}

#[test]
fn store_url_needs_the_postgres_store_and_every_bus_kind_loads() {
    let error = load_err(
        "[store]\nkind = \"memory\"\nurl = \"postgres://u@127.0.0.1/db\"\n",
        &[],
    );
    assert_eq!(keys(&error), ["store.url"]);
    assert!(problem(&error, "store.url").message.contains("memory"));

    for bus in ["nats", "kafka"] {
        let config = load_ok(&format!("[bus]\nkind = {bus:?}\n"), &[]);
        assert_eq!(format!("{:?}", config.bus.kind).to_lowercase(), bus);
    }

    let error = load_err("[bus]\nkind = \"carrier-pigeon\"\n", &[]);
    assert!(
        error.problems.iter().any(|p| p.key.contains("bus")),
        "{error}"
    );

    let error = load_err(
        "[store]\nkind = \"postgres\"\nurl = \"definitely not a url\"\n",
        &[],
    );
    assert_eq!(keys(&error), ["store.url"], "{error}");
    let config = load_toml(
        "[store]\nkind = \"postgres\"\nurl = \"host=127.0.0.1 user=postgres dbname=test\"\n",
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.store.kind, StoreKind::Postgres);
}

#[test]
fn node_ids_are_validated_and_generated_once() {
    let error = load_err("[node]\nid = \"\"\n", &[]);
    assert_eq!(keys(&error), ["node.id"]);
    assert!(problem(&error, "node.id").message.contains("node id"));

    let config = Config::default();
    let id = config.node_id();
    assert!(id.starts_with("node-"), "{id}");
    assert_eq!(config.node_id(), id);
    let named = load_toml("[node]\nid = \"node-7\"\n", &[]).unwrap();
    assert_eq!(named.node_id(), "node-7");
}

#[test]
fn config_error_display_lists_every_problem_line() {
    let error = ConfigError {
        problems: vec![
            Problem {
                key: "store.url".into(),
                message: "is required".into(),
            },
            Problem {
                key: "http.listen".into(),
                message: "\"nope\" is not an address".into(),
            },
            Problem {
                key: "WEIR_STORE_URL".into(),
                message: "use WEIR_STORE__URL".into(),
            },
        ],
    };
    assert_eq!(
        error.to_string(),
        "invalid configuration:\n  - store.url: is required\n  - http.listen: \"nope\" is not an address\n  - WEIR_STORE_URL: use WEIR_STORE__URL"
    );

    let error = load_err("[store]\npool_size = 0\n[http]\nlisten = \"nope\"\n", &[]);
    let shown = error.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 1 + error.problems.len(), "{shown}");
    assert_eq!(lines[0], "invalid configuration:");
    for (line, problem) in lines[1..].iter().zip(&error.problems) {
        assert_eq!(*line, format!("  - {problem}"));
    }
}

#[test]
fn the_shutdown_grace_may_not_exceed_the_handover_timeout() {
    let defaults = load_ok("", &[]);
    assert!(defaults.node.shutdown_grace <= defaults.broker.handover_timeout);
    load_ok(
        "[node]\nshutdown_grace = \"10s\"\n[broker]\nhandover_timeout = \"10s\"\n",
        &[],
    );
    let error = load_err(
        "[node]\nshutdown_grace = \"30s\"\n",
        &[("WEIR_BROKER__HANDOVER_TIMEOUT", "10s")],
    );
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["node.shutdown_grace"]);
    assert!(
        error.problems[0].message.contains("handover_timeout (10s)"),
        "{error}"
    );
}

#[test]
fn admin_tokens_are_read_checked_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let config = load_ok(
        &format!(
            "[http]\nadvertise = \"http://10.0.0.5:9600\"\nadmin_token_file = {:?}\n[http.admin_tokens]\nci = \"ci-secret-token\"\n",
            file.display().to_string()
        ),
        &[],
    );
    let mut tokens = config.http.admin_tokens().unwrap();
    tokens.sort();
    assert_eq!(
        tokens,
        [
            ("admin".to_owned(), "from-a-file".to_owned()),
            ("ci".to_owned(), "ci-secret-token".to_owned())
        ]
    );
    assert_eq!(config.http.admin_url(), "http://10.0.0.5:9600");
    let printed = config.to_redacted_toml();
    assert!(!printed.contains("ci-secret-token"), "{printed}");
    assert!(!format!("{:?}", config.http).contains("ci-secret-token"));
    let from_env = load_ok("", &[("WEIR_HTTP__ADMIN_TOKEN", "env-secret-token")]);
    assert!(!from_env.to_redacted_toml().contains("env-secret-token"));
    assert_eq!(from_env.http.admin_url(), "http://127.0.0.1:9600");

    let error = load_err(
        "[http]\nadvertise = \"10.0.0.5:9600\"\nadmin_token = \" \"\nadmin_token_file = \"/nonexistent/token\"\n",
        &[],
    );
    let mut found = keys(&error);
    found.sort_unstable();
    assert_eq!(
        found,
        [
            "http.admin_token",
            "http.admin_token_file",
            "http.admin_token_file",
            "http.advertise"
        ],
        "{error}"
    );
}

#[test]
fn filters_routes_and_formats_are_read_from_the_subscription() {
    let config = load_ok(
        r#"
            [[subscriptions]]
            group = "eu-orders"
            sources = ["category:orders", "category:payments"]
            filter = { names = ["Order*", "PaymentFailed"], exclude_names = ["OrderViewed"], metadata = { tenant = "eu" } }
            sink = { kind = "kafka", topic = "events.{category}", format = "cloudevents-binary", cloudevents_source = "urn:shop:{category}" }
            unmatched = "dead_letter"

            [[subscriptions.routes]]
            match = { names = ["Order*"], category = "orders" }
            topic = "orders.{name}"
            key = "{stream}"

            [[subscriptions.routes]]
            match = { category = "payments" }
            topic = "payments"
        "#,
        &[],
    );
    let subscription = &config.subscriptions[0];
    let filter = subscription.filter.as_ref().expect("a filter");
    assert_eq!(filter.names.as_ref().map(Vec::len), Some(2));
    assert_eq!(filter.metadata["tenant"], "eu");
    assert_eq!(
        subscription.consumer_settings().filter.as_ref(),
        Some(filter),
        "the consumers get the filter"
    );
    assert_eq!(subscription.routes.len(), 2);
    assert_eq!(subscription.routes[0].key.as_deref(), Some("{stream}"));
    assert_eq!(subscription.unmatched, crate::sink::Unmatched::DeadLetter);
    assert_eq!(
        subscription.sink,
        SinkConfig::Kafka {
            topic: "events.{category}".into(),
            format: crate::sink::Format::CloudeventsBinary,
            cloudevents_source: Some("urn:shop:{category}".into()),
        }
    );
    // What config check prints loads back the same.
    let printed = config.to_redacted_toml();
    let again = load_ok(&printed, &[]);
    assert_eq!(again.subscriptions, config.subscriptions, "{printed}");
}

#[test]
fn filters_and_routes_that_cannot_work_are_refused_by_key() {
    let error = load_err(
        r#"
            [[subscriptions]]
            group = "a"
            sources = ["log"]
            filter = { names = [] }
            sink = { kind = "nats", subject = "events.{category}" }

            [[subscriptions.routes]]
            match = {}
            topic = "orders"

            [[subscriptions.routes]]
            match = { names = [] }
            subject = "x.{nope}"

            [[subscriptions]]
            group = "b"
            sources = ["log"]
            filter = { exclude_names = ["*"] }
            unmatched = "skip"

            [[subscriptions]]
            group = "c"
            sources = ["log"]
            sink = { kind = "kafka", topic = "t", cloudevents_source = "weir://{stream}" }

            [[subscriptions.routes]]
            match = { category = "orders" }
            subject = "orders"
            key = "{strem}"

            [[subscriptions]]
            group = "d"
            sources = ["log"]
            sink = { kind = "kafka", topic = "t", format = "cloudevents-structured", cloudevents_source = "a b" }

            [[subscriptions.routes]]
            match = { category = "orders" }
            topic = "orders/{name}"

            [[subscriptions]]
            group = "e"
            sources = ["log"]

            [[subscriptions.routes]]
            match = { category = "orders" }
            subject = "orders"
        "#,
        &[],
    );
    let mut found = keys(&error);
    found.sort_unstable();
    assert_eq!(
        found,
        [
            "subscriptions[0].filter.names",
            "subscriptions[0].routes[0].subject",
            "subscriptions[0].routes[0].topic",
            "subscriptions[0].routes[1].match",
            "subscriptions[0].routes[1].match.names",
            "subscriptions[0].routes[1].subject",
            "subscriptions[1].filter.exclude_names",
            "subscriptions[1].unmatched",
            "subscriptions[2].routes[0].key",
            "subscriptions[2].routes[0].subject",
            "subscriptions[2].routes[0].topic",
            "subscriptions[2].sink.cloudevents_source",
            "subscriptions[3].routes[0].topic",
            "subscriptions[3].sink.cloudevents_source",
            "subscriptions[4].routes",
        ],
        "{error}"
    );
    assert!(
        problem(&error, "subscriptions[0].filter.names")
            .message
            .contains("keeps no event"),
        "{error}"
    );
    assert!(
        problem(&error, "subscriptions[0].routes[1].match")
            .message
            .contains("routes[0]"),
        "{error}"
    );
    assert!(
        problem(&error, "subscriptions[2].sink.cloudevents_source")
            .message
            .contains("applies only with format"),
        "{error}"
    );

    let unknown = load_err(
        r#"
            [[subscriptions]]
            group = "a"
            sources = ["log"]
            sink = { kind = "kafka", topic = "t", format = "cloudevents" }
        "#,
        &[],
    );
    assert!(unknown.to_string().contains("cloudevents"), "{unknown}");
}

#[test]
fn an_https_advertise_address_is_refused() {
    let error = load_err("[http]\nadvertise = \"https://10.0.0.5:9600\"\n", &[]);
    assert_eq!(keys(&error), ["http.advertise"], "{error}");
    assert!(error.to_string().contains("plain http"), "{error}");
    let config = load_ok("[http]\nadvertise = \"http://10.0.0.5:9600\"\n", &[]);
    assert_eq!(config.http.admin_url(), "http://10.0.0.5:9600");
}
