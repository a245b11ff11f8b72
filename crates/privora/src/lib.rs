//! Privora: a real-time one-to-one chat server, wire-compatible with the original Privora
//! (FastAPI) backend. See ARCHITECTURE.md for the shape and docs/protocol.md for the protocol.

pub mod api;
pub mod auth;
pub mod client_addr;
pub mod config;
pub mod directory;
pub mod error;
pub mod firebase;
pub mod hub;
pub mod metrics;
pub mod openapi;
pub mod server;
pub mod session;
pub mod signal;
pub mod store;
pub mod web;

pub use server::{start, RunningServer};
