//! What integration tests need: service addresses from the environment, a Postgres
//! store isolated in its own schema, and the rule that a missing service fails a
//! test under `WEIR_REQUIRE_SERVICES=1` instead of skipping it.

use std::sync::Arc;

use weir::postgres::{PostgresStore, PostgresStoreOptions};

pub mod bus_suite;
pub mod certs;
#[cfg(any(feature = "nats", feature = "kafka"))]
pub mod cloudevents;
pub mod fleet;
pub mod node;
pub mod nodes;
pub mod promql;
#[cfg(any(feature = "nats", feature = "kafka"))]
pub mod reader;
pub mod services;
#[cfg(all(feature = "postgres", feature = "nats"))]
pub mod writers;

/// Defines, for each test body `NAME(backend)` of the file, a test `memory::NAME`
/// run with `BACKEND::memory()` and a test `postgres::NAME` run with
/// `BACKEND::postgres().await`, which returns `None` (after noting the skip, or
/// failing under `WEIR_REQUIRE_SERVICES=1`) when Postgres is unreachable. Each test
/// gets a multi-threaded runtime of `workers` threads (default 2).
#[macro_export]
macro_rules! on_every_backend {
    ($backend:ident: $($name:ident),* $(,)?) => {
        $crate::on_every_backend!($backend, workers = 2: $($name),*);
    };
    ($backend:ident, workers = $workers:literal: $($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = $workers)]
                async fn $name() {
                    super::$name(super::$backend::memory()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = $workers)]
                async fn $name() {
                    if let Some(backend) = super::$backend::postgres().await {
                        super::$name(backend).await;
                    }
                }
            )*
        }
    };
}

pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Appends one event named `Happened` per payload to stream `orders/order-1`.
pub async fn append_orders(
    store: &dyn weir::store::EventStore,
    payloads: impl IntoIterator<Item = serde_json::Value>,
) -> Vec<weir::event::StoredEvent> {
    use weir::event::{Category, EventName, NewEvent, StreamName, WriteCondition};
    let events = payloads
        .into_iter()
        .map(|payload| NewEvent::new(EventName::new("Happened").unwrap(), payload))
        .collect();
    store
        .append(
            &Category::new("orders").unwrap(),
            &StreamName::new("order-1").unwrap(),
            WriteCondition::Any,
            events,
        )
        .await
        .unwrap()
}

/// Waits until everything up to `through` is readable from `source`, a log or
/// category source. On Postgres an append becomes readable there only once
/// every older transaction on the server has ended, other tests' included (a
/// reader never moves past a transaction that may still commit); stream reads
/// need no wait.
pub async fn wait_until_readable(
    store: &dyn weir::store::EventStore,
    source: &weir::event::Source,
    through: weir::event::Cursor,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let head = store.head(source).await.unwrap();
        if head.is_some_and(|h| h.cursor >= through) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{through} never became readable from {source}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

pub fn postgres_url() -> String {
    std::env::var("WEIR_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into())
}

/// The shared NATS server's URL: `WEIR_TEST_NATS_URL`, or [`DEFAULT_NATS_URL`].
pub fn nats_url() -> String {
    std::env::var("WEIR_TEST_NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.into())
}

/// The shared Kafka-protocol broker's addresses, `WEIR_TEST_KAFKA_BROKERS`;
/// `None` (after noting the skip, or failing under `WEIR_REQUIRE_SERVICES=1`)
/// when it is not set.
pub fn kafka_brokers() -> Option<String> {
    let brokers = std::env::var("WEIR_TEST_KAFKA_BROKERS").ok();
    if brokers.is_none() {
        service_missing(
            "Kafka",
            "WEIR_TEST_KAFKA_BROKERS is not set (scripts/test.sh starts a broker and sets it)",
        );
    }
    brokers
}

pub fn services_required() -> bool {
    std::env::var("WEIR_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Fails the test if services are required; otherwise notes the skip.
pub fn service_missing(service: &str, error: impl std::fmt::Display) {
    if services_required() {
        panic!("WEIR_REQUIRE_SERVICES=1 but {service} is unreachable: {error}");
    }
    eprintln!(
        "skipping: {service} is unreachable ({error}); set WEIR_REQUIRE_SERVICES=1 to fail instead"
    );
}

/// Sends the library's logs to the test output when `WEIR_TEST_LOG` holds a filter
/// (e.g. `WEIR_TEST_LOG=weir=debug`), for looking into a failing test.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("WEIR_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// Whether this process is the one to run the test `name` (its path in this
/// binary, such as `observability::x`), for a test that sets up what is global
/// to a process, the metrics recorder for one, which every other test running
/// in the process would then write to. In the test binary's own run this runs
/// the binary again for that test alone, forwards its output, fails if the test
/// did not pass there and returns `false`; in that second process it returns
/// `true`, and the test goes on.
pub async fn alone(name: &str) -> bool {
    const ALONE: &str = "WEIR_TEST_ALONE";
    if std::env::var(ALONE).is_ok_and(|alone| alone == name) {
        return true;
    }
    let binary = std::env::current_exe().expect("the test binary's path");
    let output = tokio::process::Command::new(binary)
        .args([name, "--exact", "--test-threads=1"])
        .env(ALONE, name)
        .output()
        .await
        .expect("the test binary runs again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} did not pass in a process of its own ({})",
        output.status
    );
    false
}

/// The suites that run fleets of `weir` processes against real services
/// (`e2e_bridge`, `fault_suite`, `operate`) take turns, each test holding this
/// while it runs: two fleets at once on a small machine starve each other's
/// nodes of CPU, and the leases and member timeouts those suites measure
/// against would then measure the machine. (As test binaries of their own they
/// ran one at a time.)
pub async fn heavy_turn() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Waits until `done` holds, checking every few milliseconds; fails after half
/// a minute, a guard against hangs.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// One backend's consumer stores (events, checkpoints, dead letters), and the
/// database they live in, kept alive for the test: the `BACKEND` of
/// [`on_every_backend!`] for tests of consumers.
pub struct ConsumerBackend {
    pub stores: weir::runtime::ConsumerStores,
    /// Held only so that the schema outlives the test.
    pub _db: Option<TestPostgres>,
}

impl ConsumerBackend {
    pub fn memory() -> Self {
        Self {
            stores: weir::runtime::ConsumerStores::in_memory(Arc::new(
                weir::store::MemoryStore::new(),
            )),
            _db: None,
        }
    }

    pub async fn postgres() -> Option<Self> {
        let db = TestPostgres::start().await?;
        Some(Self {
            stores: weir::runtime::ConsumerStores::postgres(Arc::clone(&db.store)),
            _db: Some(db),
        })
    }
}

/// A migrated Postgres store in a schema of its own, dropped with this value.
pub struct TestPostgres {
    pub store: Arc<PostgresStore>,
    pub schema: String,
    pub url: String,
    /// The server's URL, for connections of the test's own.
    server: String,
    /// The server, when it is the test's own: stopped after the schema is
    /// dropped.
    private: Option<services::PrivatePostgres>,
}

impl TestPostgres {
    /// `None` (after noting the skip) when Postgres is unreachable and not required.
    pub async fn start() -> Option<Self> {
        Self::start_with(|options| options).await
    }

    pub async fn start_with(
        configure: impl FnOnce(PostgresStoreOptions) -> PostgresStoreOptions,
    ) -> Option<Self> {
        Self::start_on(postgres_url(), configure).await
    }

    /// On a server of its own ([`services::PrivatePostgres`]) rather than the
    /// shared one, for a test that holds a transaction open: that holds back the
    /// readers of every schema on its server, other tests' included (see
    /// [`wait_until_readable`]). `None` (after noting the skip) when no server
    /// can be started here and services are not required.
    pub async fn private() -> Option<Self> {
        let server = tokio::task::spawn_blocking(services::PrivatePostgres::start)
            .await
            .expect("starting a private PostgreSQL server")?;
        let mut db = Self::start_on(server.url("postgres"), |options| options).await?;
        db.private = Some(server);
        Some(db)
    }

    async fn start_on(
        server: String,
        configure: impl FnOnce(PostgresStoreOptions) -> PostgresStoreOptions,
    ) -> Option<Self> {
        let schema = unique_name("weir_test");
        // A distinct application name lets a test find (and terminate) its own connections.
        let url = with_application_name(&server, &schema);
        let options = configure(
            PostgresStoreOptions::new(url.clone())
                .schema(&schema)
                .pool_size(8),
        );
        let store = match PostgresStore::connect(&options) {
            Ok(store) => store,
            Err(e) => {
                service_missing("Postgres", e);
                return None;
            }
        };
        match store.migrate().await {
            Ok(_) => Some(Self {
                store: Arc::new(store),
                schema,
                url,
                server,
                private: None,
            }),
            Err(e) if e.is_retryable() => {
                service_missing("Postgres", e);
                None
            }
            Err(e) => panic!("migrating the test schema failed: {e}"),
        }
    }

    /// A plain connection, outside the store's pool.
    pub async fn raw_client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.server, tokio_postgres::NoTls)
            .await
            .expect("connect to Postgres");
        tokio::spawn(connection);
        client
    }
}

fn with_application_name(url: &str, name: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name={name}")
}

/// Runs `cleanup` to completion from a `Drop`: drops run inside the test's
/// runtime, which cannot block on itself, so this uses a thread with a runtime
/// of its own.
pub fn clean_up_on_drop<F>(cleanup: F) -> Option<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for cleanup")
            .block_on(cleanup)
    })
    .join()
    .ok()
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let (schema, server) = (self.schema.clone(), self.server.clone());
        let dropped = clean_up_on_drop(async move {
            let (client, connection) =
                tokio_postgres::connect(&server, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .await
        });
        if let Some(Err(e)) = dropped {
            eprintln!("could not drop test schema {}: {e}", self.schema);
        }
    }
}
