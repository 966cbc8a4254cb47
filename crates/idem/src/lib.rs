//! The `idem` gateway as a library: the binary in `main.rs` only parses flags and calls
//! [`serve::run`].

pub mod admin;
pub mod config;
pub mod dead_letters;
pub mod guard;
pub mod keys;
pub mod outbox;
pub mod proxy;
pub mod relay;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod telemetry;
