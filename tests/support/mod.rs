//! Shared helpers of the integration tests: a real `redis-server` per test (`redis_server`),
//! a real local Redis Cluster of 3 masters + 3 replicas (`cluster`), the `creditgate` binary
//! as a child process (`gateway`) and a minimal HTTP client (`http`). Every test file that
//! needs them says `mod support;`; items a file does not use must not warn, hence the allows.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod gateway;
pub mod http;
pub mod redis_server;

pub use self::cluster::RedisCluster;
pub use self::redis_server::RedisServer;
