//! fanout: pushes messages from Kafka to WebSocket clients, filtered by what each user
//! switched on.
//!
//! `ingest` (Kafka) → `bus` (Redis / in-process) → `router` + `registry` (local sessions)
//! → `gateway` (WebSocket sessions)
//!
//! The modules import each other in one direction only, leaves first (`scripts/check-modules`
//! fails on a cycle): [`types`], [`user_id`], [`clock`], [`protocol`] and [`http`] depend on no
//! other module; [`app`] on nearly all.
//!
//! * [`clock`] — wall-clock stamps (ms, µs) the pipeline measures with.
//! * [`config`] — layered, validated settings (DESIGN §7).
//! * [`envelope`] — the Kafka envelope: decoding, recipients, the rendered `msg` frame.
//! * [`ingest`] — consumer group; publishes each record on the bus, then stores its offset.
//! * [`kafka`] — shared librdkafka configuration and the producer (ask, dead letters).
//! * [`bus`] — the pub/sub every node shares, with sequence numbers and the message history
//!   (resume, gap recovery): trait, wire format, Redis and local versions.
//! * [`router`] — bus message → the local connections it targets, filtered by preferences;
//!   recovers what the node missed after a bus gap.
//! * [`presence`] — every user's live connections on every node; the presence topic.
//! * [`prefs`] — per-user preferences: the SQL store and the change protocol.
//! * [`types`] — the message type registry, its configuration, and preference bitsets.
//! * [`user_id`] — what a user id may be, checked wherever one enters.
//! * [`protocol`] — client protocol v1: the frames clients send and the server's replies,
//!   and the close codes.
//! * [`registry`] — the index of this node's connections and their bounded queues.
//! * [`auth`] — tokens: JWT validation, the insecure mode, minting (`fanout token`).
//! * [`gateway`] — `/ws`: admission, handshake, one session per connection.
//! * [`kick`] — disconnecting a user everywhere, and revoking their tokens.
//! * [`http`] — the JSON error body every HTTP error of both ports carries.
//! * [`api`] — the public HTTP API.
//! * [`demo`] — the demo page at `/`.
//! * [`admin`] — metrics, health, readiness, stats.
//! * [`metrics`] — every Prometheus metric, registered once.
//! * [`receipts`] — delivery receipts for the backend (`kafka.receipts_topic`).
//! * [`shutdown`] — signals and closing sessions.
//! * [`app`] — wiring all of the above into a running node.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod bus;
pub mod clock;
pub mod config;
pub mod demo;
pub mod envelope;
pub mod gateway;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod kick;
pub mod metrics;
pub mod prefs;
pub mod presence;
pub mod protocol;
pub mod receipts;
pub mod registry;
pub mod router;
pub mod shutdown;
pub mod types;
pub mod user_id;
