//! Integration tests: a real `privora` server on a temporary SQLite file, real WebSocket and
//! HTTP clients. One test binary, so that it links once.

mod support;

mod chat;
mod delivery;
mod errors;
mod rest;
mod store;
// deployment and operations (issue 7)
mod browser;
mod nginx;
mod ops;
