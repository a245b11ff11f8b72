//! Integration tests: a real `privora` server on a temporary SQLite file, real WebSocket and
//! HTTP clients. One test binary, so that it links once.

mod support;

mod chat;
mod cluster;
mod delivery;
mod errors;
mod firebase_emulator;
mod firebase_oauth;
mod firebase_tokens;
mod rest;
mod store;
// deployment and operations (issue 7)
mod browser;
mod nginx;
mod ops;
