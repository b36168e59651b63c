//! `weir migrate`: create or upgrade the store's schema.

use super::CliError;
use crate::config::{Config, StoreKind};

pub async fn run(config: &Config) -> Result<(), CliError> {
    match config.store.kind {
        StoreKind::Memory => {
            println!("the memory store keeps no schema: nothing to migrate");
            Ok(())
        }
        #[cfg(feature = "postgres")]
        StoreKind::Postgres => {
            let store = super::open_postgres(config)?;
            let report = store.migrate().await?;
            if report.applied.is_empty() {
                println!(
                    "schema {} is up to date at version {}",
                    report.schema, report.version
                );
            }
            for (version, name) in &report.applied {
                println!("schema {}: applied {version} {name}", report.schema);
            }
            Ok(())
        }
        #[cfg(not(feature = "postgres"))]
        StoreKind::Postgres => Err(CliError::Usage(
            "this weir was built without the `postgres` feature".into(),
        )),
    }
}
