//! Versioned schema migrations, applied by `weir migrate` and recorded in
//! `weir_migrations`. Applying is idempotent and safe to run from several processes
//! at once: an advisory lock per schema serialises them.

use super::PostgresStore;
use crate::store::{Error, Result};

/// One schema change. Versions are applied in order and never edited once released.
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: include_str!("migrations/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "broker",
        sql: include_str!("migrations/0002_broker.sql"),
    },
    Migration {
        version: 3,
        name: "consumers",
        sql: include_str!("migrations/0003_consumers.sql"),
    },
    Migration {
        version: 4,
        name: "slices",
        sql: include_str!("migrations/0004_slices.sql"),
    },
    Migration {
        version: 5,
        name: "claim grants",
        sql: include_str!("migrations/0005_claim_grants.sql"),
    },
    Migration {
        version: 6,
        name: "operate",
        sql: include_str!("migrations/0006_operate.sql"),
    },
    Migration {
        version: 7,
        name: "lifecycle",
        sql: include_str!("migrations/0007_lifecycle.sql"),
    },
    Migration {
        version: 8,
        name: "group epochs",
        sql: include_str!("migrations/0008_group_epochs.sql"),
    },
    Migration {
        version: 9,
        name: "ingest",
        sql: include_str!("migrations/0009_ingest.sql"),
    },
    Migration {
        version: 10,
        name: "admin requests",
        sql: include_str!("migrations/0010_admin_requests.sql"),
    },
];

/// The schema version this build of weir needs.
pub const CURRENT_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub schema: String,
    /// Versions and names applied now; empty if the schema was up to date.
    pub applied: Vec<(i32, String)>,
    pub version: i32,
}

impl PostgresStore {
    /// Creates the schema if needed and applies every migration it lacks.
    pub async fn migrate(&self) -> Result<MigrationReport> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(super::classify)?;
        let schema = super::quote_identifier(&self.schema);
        // Taken before CREATE SCHEMA, which is not safe to race.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('weir migrate ' || $1, 0))",
            &[&self.schema],
        )
        .await
        .map_err(super::classify)?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             SET LOCAL search_path TO {schema};
             CREATE TABLE IF NOT EXISTS weir_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(super::classify)?;
        let found: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM weir_migrations", &[])
            .await
            .map_err(super::classify)?
            .get(0);
        if found > CURRENT_VERSION {
            return Err(Error::SchemaTooNew {
                schema: self.schema.clone(),
                found,
                known: CURRENT_VERSION,
            });
        }
        let mut applied = Vec::new();
        for migration in MIGRATIONS.iter().filter(|m| m.version > found) {
            tx.batch_execute(migration.sql)
                .await
                .map_err(|e| match super::classify(e) {
                    Error::Backend(message) => Error::Backend(format!(
                        "migration {} ({}) failed: {message}",
                        migration.version, migration.name
                    )),
                    other => other,
                })?;
            tx.execute(
                "INSERT INTO weir_migrations (version, name) VALUES ($1, $2)",
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(super::classify)?;
            applied.push((migration.version, migration.name.to_owned()));
        }
        tx.commit().await.map_err(super::classify)?;
        Ok(MigrationReport {
            schema: self.schema.clone(),
            applied,
            version: CURRENT_VERSION,
        })
    }

    /// Fails with a message naming `weir migrate` unless the schema is at the version
    /// this build needs.
    pub async fn check_schema(&self) -> Result<()> {
        let client = self.client().await?;
        let table = format!("{}.weir_migrations", super::quote_identifier(&self.schema));
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map_err(super::classify)?
            .get(0);
        let found: i32 = if exists {
            client
                .query_one(
                    &format!("SELECT coalesce(max(version), 0) FROM {table}"),
                    &[],
                )
                .await
                .map_err(super::classify)?
                .get(0)
        } else {
            0
        };
        match found.cmp(&CURRENT_VERSION) {
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Less => Err(Error::NotMigrated {
                schema: self.schema.clone(),
                found,
                expected: CURRENT_VERSION,
            }),
            std::cmp::Ordering::Greater => Err(Error::SchemaTooNew {
                schema: self.schema.clone(),
                found,
                known: CURRENT_VERSION,
            }),
        }
    }
}
