//! The broker: who owns which source. The pure allocation function, the leadership
//! lease with epochs, and the membership registry; the coordinator, the observer and
//! the roles that wire them together build on these.

pub mod allocation;
pub mod lease;
pub mod membership;
pub mod settings;

pub use settings::BrokerSettings;
