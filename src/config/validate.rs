//! Validation: pure checks of everything that can be checked without connecting
//! anywhere. Every problem is reported, not only the first, each at its key path.
//! One validator per section; the sections owned by lower layers get their checks
//! here too, since only config reports problems to the person configuring.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use super::{
    BusConfig, BusKind, Config, DemoConfig, HttpConfig, KafkaOptions, LogConfig, NatsOptions,
    NodeConfig, Problem, SinkConfig, StoreConfig, StoreKind, SubscriptionConfig,
};
use crate::connect::nats::MAX_REPLICAS;
use crate::event::{NameKind, validate_name};

/// The problems found so far, in the order they are reported.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: &str, message: String) {
        self.0.push(Problem {
            key: key.to_owned(),
            message,
        });
    }

    /// Adds the (key, message) pairs of a section validator, keys under `prefix`.
    fn add_under<K: AsRef<str>>(&mut self, prefix: &str, found: Vec<(K, String)>) {
        for (key, message) in found {
            self.add(&format!("{prefix}.{}", key.as_ref()), message);
        }
    }
}

impl Config {
    /// Checks everything that can be checked without connecting anywhere.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Problems::default();
        // The order is the order problems have always been listed in, so node tags
        // come after the connection sections rather than with the node id.
        validate_node_id(&self.node, &mut problems);
        validate_store(&self.store, &mut problems);
        validate_bus(&self.bus, &mut problems);
        problems.add_under("nats", self.nats.validate());
        problems.add_under("kafka", self.kafka.validate());
        problems.add_under("demo", self.demo.validate());
        validate_node_tags(&self.node, &mut problems);
        problems.add_under("broker", self.broker.validate());
        validate_http(&self.http, &mut problems);
        validate_log(&self.log, &mut problems);
        validate_subscriptions(&self.subscriptions, &mut problems);
        validate_ingest(self, &mut problems);
        problems.add_under("lifecycle", self.lifecycle.validate());
        check_grace_within_handover(self, &mut problems);
        problems.0
    }
}

/// A stopping consumer may take `node.shutdown_grace` to finish its batch and store
/// its checkpoint; a coordinator gives a moving source to its new owner after
/// `broker.handover_timeout` whether released or not. A grace longer than the
/// handover would let the new owner start before the old one's checkpoint is
/// stored, repeating events a planned handover promises to process once.
fn check_grace_within_handover(config: &Config, problems: &mut Problems) {
    let (grace, handover) = (config.node.shutdown_grace, config.broker.handover_timeout);
    // A zero handover timeout is reported by the broker's own checks.
    if grace > handover && !handover.is_zero() {
        problems.add(
            "node.shutdown_grace",
            format!(
                "{} is longer than broker.handover_timeout ({}): a source could move to its new owner before this node stores its checkpoint, and events would be processed twice; make shutdown_grace at most handover_timeout",
                humantime::format_duration(grace),
                humantime::format_duration(handover)
            ),
        );
    }
}

fn validate_node_id(node: &NodeConfig, problems: &mut Problems) {
    if let Some(id) = &node.id {
        if let Err(e) = crate::event::StreamName::new(id.as_str()) {
            problems.add("node.id", e.to_string().replace("stream name", "node id"));
        }
    }
}

fn validate_node_tags(node: &NodeConfig, problems: &mut Problems) {
    for tag in &node.tags {
        if !is_token(tag) {
            problems.add(
                "node.tags",
                format!("{tag:?} is not a valid tag: use 1 to 48 letters, digits, '-' and '_'"),
            );
        }
    }
}

fn validate_store(store: &StoreConfig, problems: &mut Problems) {
    match (store.kind, &store.url) {
        (StoreKind::Memory, Some(_)) => problems.add(
            "store.url",
            "is set but store.kind is \"memory\": set store.kind = \"postgres\" to use it, or remove the url".into(),
        ),
        (StoreKind::Postgres, None) => problems.add(
            "store.url",
            "is required when store.kind is \"postgres\", e.g. postgres://user@127.0.0.1:5432/weir".into(),
        ),
        (StoreKind::Postgres, Some(url)) => {
            if let Err(message) = check_postgres_url(url, &store.tls) {
                problems.add("store.url", message);
            }
        }
        (StoreKind::Memory, None) => {}
    }
    if store.kind == StoreKind::Postgres && !cfg!(feature = "postgres") {
        problems.add(
            "store.kind",
            "this weir was built without the `postgres` feature".into(),
        );
    }
    if !is_simple_identifier(&store.schema) {
        problems.add(
            "store.schema",
            format!(
                "{:?} is not a valid schema name: use 1 to 48 lowercase letters, digits and '_', starting with a letter or '_'",
                store.schema
            ),
        );
    }
    if !(1..=1000).contains(&store.pool_size) {
        problems.add(
            "store.pool_size",
            format!("{} is out of range: use 1 to 1000", store.pool_size),
        );
    }
    if store.connect_timeout.is_zero() {
        problems.add("store.connect_timeout", "must be longer than 0s".into());
    }
    if let Some(read_url) = &store.read_url {
        if store.kind != StoreKind::Postgres {
            problems.add(
                "store.read_url",
                "is set but store.kind is not \"postgres\": remove it, or use the Postgres store"
                    .into(),
            );
        } else if let Err(message) = check_postgres_url(read_url, &store.tls) {
            problems.add("store.read_url", message);
        }
    }
    if store.read_max_lag.is_zero() {
        problems.add("store.read_max_lag", "must be longer than 0s".into());
    }
}

fn validate_bus(bus: &BusConfig, problems: &mut Problems) {
    if let Some(feature) = bus.kind.missing_feature() {
        problems.add(
            "bus.kind",
            format!("this weir was built without the `{feature}` feature"),
        );
    }
    if !is_token(&bus.namespace) {
        problems.add(
            "bus.namespace",
            format!(
                "{:?} is not a valid namespace: use 1 to 48 letters, digits, '-' and '_'",
                bus.namespace
            ),
        );
    }
    if bus.signal_retention < Duration::from_secs(1) {
        problems.add("bus.signal_retention", "must be at least 1s".into());
    }
}

fn validate_http(http: &HttpConfig, problems: &mut Problems) {
    if let Err(e) = http.listen.parse::<SocketAddr>() {
        problems.add(
            "http.listen",
            format!(
                "{:?} is not an address: {e}; write IP:PORT, e.g. 0.0.0.0:9600",
                http.listen
            ),
        );
    }
    if let Some(advertise) = &http.advertise {
        if advertise.starts_with("https://") {
            // The node serves plain HTTP and the CLI speaks nothing else: an
            // https address would be advertised to a CLI that cannot follow it.
            problems.add(
                "http.advertise",
                format!(
                    "{advertise:?}: weir serves and follows plain http only; advertise the node's own http:// address (e.g. http://10.0.0.5:9600)"
                ),
            );
        } else if !advertise.starts_with("http://") {
            problems.add(
                "http.advertise",
                format!("{advertise:?} is not a URL: write e.g. http://10.0.0.5:9600"),
            );
        }
    }
    if http.admin_token.is_some() && http.admin_token_file.is_some() {
        problems.add(
            "http.admin_token_file",
            "set admin_token or admin_token_file, not both".into(),
        );
    }
    if let Some(path) = &http.admin_token_file {
        match std::fs::read_to_string(path) {
            Ok(token) if token.trim().is_empty() => problems.add(
                "http.admin_token_file",
                format!("{} is empty: put the admin token in it", path.display()),
            ),
            Ok(_) => {}
            Err(error) => problems.add(
                "http.admin_token_file",
                format!("cannot read {}: {error}", path.display()),
            ),
        }
    }
    let empty = http
        .admin_token
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
        || http.admin_tokens.values().any(|t| t.trim().is_empty());
    if empty {
        problems.add(
            "http.admin_token",
            "an admin token is empty: give it a long random value, or leave it out".into(),
        );
    }
}

fn validate_log(log: &LogConfig, problems: &mut Problems) {
    if let Err(error) = crate::telemetry::logging::parse_filter(&log.level, "log.level") {
        problems.add("log.level", error.reason);
    }
}

fn validate_subscriptions(subscriptions: &[SubscriptionConfig], problems: &mut Problems) {
    let mut groups = HashSet::new();
    for (i, subscription) in subscriptions.iter().enumerate() {
        let key = |field: &str| format!("subscriptions[{i}].{field}");
        if let Err(e) = validate_name(NameKind::Group, &subscription.group) {
            problems.add(&key("group"), e.to_string());
        } else if !groups.insert(subscription.group.as_str()) {
            problems.add(
                &key("group"),
                format!("group {:?} is configured twice", subscription.group),
            );
        }
        if subscription.sources.is_empty() {
            problems.add(&key("sources"), "give at least one source".into());
        }
        if subscription.instances == 0 {
            problems.add(&key("instances"), "must be at least 1".into());
        }
        if let Err(error) = crate::event::Partition::all(subscription.partitions) {
            problems.add(&key("partitions"), error.to_string());
        }
        problems.add_under(&key("consumer"), subscription.consumer.validate());
        for tag in &subscription.required_tags {
            if !is_token(tag) {
                problems.add(
                    &key("required_tags"),
                    format!("{tag:?} is not a valid tag: use 1 to 48 letters, digits, '-' and '_'"),
                );
            }
        }
        problems.add_under(&key("sink"), subscription.sink.validate());
        if let Some(filter) = &subscription.filter {
            problems.add_under(&key("filter"), filter.validate());
        }
        validate_routes(subscription, &key, problems);
    }
}

/// Each route's match and templates, against the kind of sink they route for.
fn validate_routes(
    subscription: &SubscriptionConfig,
    key: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) {
    let sink = match &subscription.sink {
        SinkConfig::Stdout => None,
        SinkConfig::Nats { .. } => Some("nats"),
        SinkConfig::Kafka { .. } => Some("kafka"),
    };
    if subscription.routes.is_empty() {
        if subscription.unmatched != crate::sink::Unmatched::Default {
            problems.add(
                &key("unmatched"),
                "applies only with routes: add [[subscriptions.routes]], or leave unmatched out"
                    .into(),
            );
        }
        return;
    }
    let Some(sink) = sink else {
        problems.add(
            &key("routes"),
            "routes need a nats or kafka sink: set sink.kind".into(),
        );
        return;
    };
    let mut catch_all: Option<usize> = None;
    for (index, route) in subscription.routes.iter().enumerate() {
        let at = |field: &str| key(&format!("routes[{index}].{field}"));
        if let Some(first) = catch_all {
            problems.add(
                &at("match"),
                format!("is never tried: routes[{first}] before it matches every event"),
            );
        }
        if route.matches.matches_everything() && catch_all.is_none() {
            catch_all = Some(index);
        }
        if let Some(names) = &route.matches.names {
            if names.is_empty() {
                problems.add(
                    &at("match.names"),
                    "is empty, so the route matches no event: list at least one name pattern, or leave names out to match every name".into(),
                );
            }
        }
        validate_route_destination(route, sink, &at, problems);
    }
    if catch_all.is_some() && subscription.unmatched != crate::sink::Unmatched::Default {
        problems.add(
            &key("unmatched"),
            "never applies: a route matches every event".into(),
        );
    }
}

/// A route's destination keys, against the kind of sink (`nats` or `kafka`).
fn validate_route_destination(
    route: &crate::sink::RouteConfig,
    sink: &str,
    at: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) {
    match sink {
        "nats" => {
            for (field, given) in [("topic", &route.topic), ("key", &route.key)] {
                if given.is_some() {
                    problems.add(
                        &at(field),
                        "is for a Kafka sink; a route of a NATS sink names a subject".into(),
                    );
                }
            }
            match &route.subject {
                None => problems.add(
                    &at("subject"),
                    "a route of a NATS sink needs a subject, e.g. \"orders.{stream}\"".into(),
                ),
                Some(subject) => {
                    if let Err(message) = check_subject(subject) {
                        problems.add(&at("subject"), format!("{subject:?} {message}"));
                    }
                }
            }
        }
        _ => {
            if route.subject.is_some() {
                problems.add(
                    &at("subject"),
                    "is for a NATS sink; a route of a Kafka sink names a topic".into(),
                );
            }
            match &route.topic {
                None => problems.add(
                    &at("topic"),
                    "a route of a Kafka sink needs a topic, e.g. \"orders.{category}\"".into(),
                ),
                Some(topic) => {
                    if let Err(message) = check_topic_template(topic) {
                        problems.add(&at("topic"), format!("{topic:?} {message}"));
                    }
                }
            }
            if let Some(template) = &route.key {
                if let Err(message) = check_template(template, |c| !c.is_control()) {
                    problems.add(&at("key"), format!("{template:?} {message}"));
                }
            }
        }
    }
}

/// Checks a NATS subject template.
fn check_subject(subject: &str) -> Result<(), String> {
    check_template(subject, |c| !c.is_whitespace() && c != '*' && c != '>').and_then(|()| {
        if subject.split('.').any(str::is_empty) {
            Err("has an empty subject token: do not start or end with '.' or write '..'".into())
        } else {
            Ok(())
        }
    })
}

/// Checks a Kafka topic template.
fn check_topic_template(topic: &str) -> Result<(), String> {
    check_template(topic, |c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Checks `sink.format` against `sink.cloudevents_source`.
fn check_cloudevents(
    format: crate::sink::Format,
    source: Option<&String>,
    problems: &mut Vec<(String, String)>,
) {
    let Some(source) = source else {
        return;
    };
    if format.is_weir() {
        problems.push((
            "cloudevents_source".into(),
            "applies only with format = \"cloudevents-binary\" or \"cloudevents-structured\""
                .into(),
        ));
    }
    if let Err(error) = crate::sink::cloudevents::CloudEvents::new(Some(source)) {
        problems.push((
            "cloudevents_source".into(),
            format!("{source:?} {}", error.reason),
        ));
    }
}

/// Each `[[ingest]]` entry, and names unique among ingests and groups: an
/// ingest's name is its group's.
fn validate_ingest(config: &Config, problems: &mut Problems) {
    let mut names: HashSet<&str> = config
        .subscriptions
        .iter()
        .map(|s| s.group.as_str())
        .collect();
    for (i, ingest) in config.ingest.iter().enumerate() {
        let prefix = format!("ingest[{i}]");
        problems.add_under(&prefix, ingest.validate());
        if !names.insert(ingest.name.as_str()) {
            problems.add(
                &format!("{prefix}.name"),
                format!(
                    "{:?} is already the name of an ingest or a subscription group",
                    ingest.name
                ),
            );
        }
        for tag in &ingest.required_tags {
            if !is_token(tag) {
                problems.add(
                    &format!("{prefix}.required_tags"),
                    format!("{tag:?} is not a valid tag: use 1 to 48 letters, digits, '-' and '_'"),
                );
            }
        }
    }
}

impl BusKind {
    /// The cargo feature this backend needs, when this build lacks it.
    pub fn missing_feature(self) -> Option<&'static str> {
        match self {
            BusKind::Memory => None,
            BusKind::Nats => (!cfg!(feature = "nats")).then_some("nats"),
            BusKind::Kafka => (!cfg!(feature = "kafka")).then_some("kafka"),
        }
    }
}

impl NatsOptions {
    /// Problems as (key within `[nats]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| problems.push((key.to_owned(), message));
        let servers: Vec<&str> = self.url.split(',').map(str::trim).collect();
        for server in &servers {
            match url::Url::parse(server) {
                Ok(url) if ["nats", "tls", "ws", "wss"].contains(&url.scheme()) => {}
                _ => problem(
                    "url",
                    format!(
                        "{server:?} is not a NATS server URL; write nats://HOST:PORT or tls://HOST:PORT"
                    ),
                ),
            }
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.credentials_file.is_some(),
        ];
        if methods.iter().filter(|set| **set).count() > 1 {
            problem(
                "user",
                "set only one of user/password, token, nkey_seed and credentials_file".into(),
            );
        }
        if self.user.is_some() != self.password.is_some() {
            problem(
                "password",
                "user and password go together: set both or neither".into(),
            );
        }
        if let Some(seed) = &self.nkey_seed {
            if !seed.starts_with("SU") {
                problem(
                    "nkey_seed",
                    "is not a user NKey seed: it starts with \"SU\" (the public key starts with \"U\")".into(),
                );
            }
        }
        if let Some(path) = &self.credentials_file {
            if !path.is_file() {
                problem(
                    "credentials_file",
                    format!("{} is not a readable file", path.display()),
                );
            }
        }
        let tls = &self.tls;
        for (key, path) in [
            ("tls.ca_file", &tls.ca_file),
            ("tls.cert_file", &tls.cert_file),
            ("tls.key_file", &tls.key_file),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    problem(key, format!("{} is not a readable file", path.display()));
                }
            }
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            problem(
                "tls.key_file",
                "a client certificate needs its key: set both cert_file and key_file or neither"
                    .into(),
            );
        }
        if self.connect_timeout.is_zero() {
            problem("connect_timeout", "must be longer than 0s".into());
        }
        if let Some(message) = replicas_problem(self.replicas) {
            problem("replicas", message);
        }
        problems
    }
}

/// What is wrong with `nats.replicas`, if anything.
fn replicas_problem(replicas: usize) -> Option<String> {
    (!(1..=MAX_REPLICAS).contains(&replicas)).then(|| {
        format!(
            "{replicas} is out of range: use 1 to {MAX_REPLICAS} (JetStream keeps at most {MAX_REPLICAS} copies of a stream), and no more than your NATS cluster has JetStream servers"
        )
    })
}

impl KafkaOptions {
    /// Problems as (key within `[kafka]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.brokers.split(',').any(|broker| {
            let broker = broker.trim();
            broker
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        }) {
            problems.push((
                "brokers".into(),
                format!(
                    "{:?} is not a broker list; write HOST:PORT[,HOST:PORT...]",
                    self.brokers
                ),
            ));
        }
        if self.partitions < 1 {
            problems.push(("partitions".into(), "must be at least 1".into()));
        }
        if self.replication < 1 {
            problems.push(("replication".into(), "must be at least 1".into()));
        }
        if self.properties.contains_key("bootstrap.servers") {
            problems.push((
                "properties".into(),
                "set the brokers with kafka.brokers, not bootstrap.servers".into(),
            ));
        }
        problems
    }
}

impl DemoConfig {
    /// Problems as (key within `[demo]`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if !(1..=100_000).contains(&self.rate) {
            problems.push((
                "rate".into(),
                format!("{} is out of range: use 1 to 100000", self.rate),
            ));
        }
        if self.categories.is_empty() {
            problems.push(("categories".into(), "give at least one category".into()));
        }
        for category in &self.categories {
            if let Err(error) = crate::event::Category::new(category.as_str()) {
                problems.push(("categories".into(), error.to_string()));
            }
        }
        if self.streams == 0 {
            problems.push(("streams".into(), "must be at least 1".into()));
        }
        problems
    }
}

impl SinkConfig {
    /// Problems as (key within `sink`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        match self {
            SinkConfig::Stdout => {}
            SinkConfig::Nats {
                subject,
                stream,
                max_in_flight,
                format,
                cloudevents_source,
            } => {
                check_cloudevents(*format, cloudevents_source.as_ref(), &mut problems);
                if !cfg!(feature = "nats") {
                    problems.push((
                        "kind".into(),
                        "this weir was built without the `nats` feature".into(),
                    ));
                }
                if let Err(message) = check_subject(subject) {
                    problems.push(("subject".into(), format!("{subject:?} {message}")));
                }
                if let Some(stream) = stream {
                    if stream.is_empty()
                        || stream
                            .chars()
                            .any(|c| c.is_whitespace() || ".*>/\\".contains(c))
                    {
                        problems.push((
                            "stream".into(),
                            format!("{stream:?} is not a JetStream stream name: no spaces, '.', '*', '>', '/' or '\\'"),
                        ));
                    }
                }
                if *max_in_flight == 0 {
                    problems.push(("max_in_flight".into(), "must be at least 1".into()));
                }
            }
            SinkConfig::Kafka {
                topic,
                format,
                cloudevents_source,
            } => {
                check_cloudevents(*format, cloudevents_source.as_ref(), &mut problems);
                if !cfg!(feature = "kafka") {
                    problems.push((
                        "kind".into(),
                        "this weir was built without the `kafka` feature".into(),
                    ));
                }
                if let Err(message) = check_topic_template(topic) {
                    problems.push(("topic".into(), format!("{topic:?} {message}")));
                }
            }
        }
        problems
    }
}

/// Checks that `template`'s placeholders are known and its literal characters
/// pass `literal_ok`.
pub(super) fn check_template(
    template: &str,
    literal_ok: impl Fn(char) -> bool,
) -> Result<(), String> {
    let parsed = crate::sink::template::Template::parse(template).map_err(|e| e.reason)?;
    match parsed
        .with_placeholders_as("")
        .chars()
        .find(|c| !literal_ok(*c))
    {
        Some(c) => Err(format!("may not contain {c:?}")),
        None => Ok(()),
    }
}

/// Letters, digits, '-' and '_', 1 to 48 of them: safe in subjects, topics and
/// label values alike.
fn is_token(value: &str) -> bool {
    (1..=48).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A Postgres schema name weir accepts: lowercase, so that it needs no quoting.
fn is_simple_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 48
}

/// Parses the URL as the Postgres client will, and `sslmode` and `[store.tls]`
/// with it; the files are read when the store opens (they may be a container's
/// mounted secret, absent where the configuration is checked). Without the
/// `postgres` feature the store kind is already reported, so nothing is checked
/// twice.
fn check_postgres_url(url: &str, tls: &super::StoreTls) -> Result<(), String> {
    #[cfg(feature = "postgres")]
    {
        crate::postgres::tls::check(url, &postgres_tls(tls))
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = (url, tls);
        Ok(())
    }
}

/// A problem with a `[store.tls]` file, found when the store opened: "[store.tls]
/// key_file /k.pem cannot be read" is about `store.tls.key_file`.
#[cfg(feature = "postgres")]
pub(crate) fn store_tls_problem(message: String) -> super::ConfigError {
    let problem = match message
        .strip_prefix("[store.tls] ")
        .and_then(|rest| rest.split_once(' '))
    {
        Some((field, rest)) => super::Problem {
            key: format!("store.tls.{field}"),
            message: rest.into(),
        },
        None => super::Problem {
            key: "store.tls".into(),
            message,
        },
    };
    super::ConfigError {
        problems: vec![problem],
    }
}

/// `[store.tls]` as the Postgres store takes it.
#[cfg(feature = "postgres")]
pub(crate) fn postgres_tls(tls: &super::StoreTls) -> crate::postgres::PostgresTls {
    crate::postgres::PostgresTls {
        ca_file: tls.ca_file.clone(),
        cert_file: tls.cert_file.clone(),
        key_file: tls.key_file.clone(),
        key_password: tls.key_password.clone(),
    }
}
