//! End-to-end scenarios: several `fanout` processes, a real Kafka-protocol broker and a
//! real Redis. Run with `./scripts/test` (it provides `FANOUT_TEST_KAFKA`).

mod bounds;
mod clients;
mod cluster;
mod delivery;
mod drain;
mod edges;
mod embedded;
mod failures;
mod groups;
mod kick;
mod limits;
mod oauth;
mod preferences;
mod presence;
mod receipts;
mod resume;
mod routed;
mod sentinel;
mod support;
mod tls;
mod undecodable;
