//! The broker: who owns which source. For now the pure allocation function; roles,
//! membership, the leadership lease, the coordinator and the observer build on it.

pub mod allocation;
