//! `weir config check`: validation happened on load; print the effective result.

use super::CliError;
use crate::config::Config;

pub fn run(config: &Config) -> Result<(), CliError> {
    print!("{}", config.to_redacted_toml());
    Ok(())
}
