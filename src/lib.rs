//! remora: a service-mesh sidecar proxy that speaks Istio's traffic API.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod body;
pub mod cli;
pub mod config;
pub mod control;
pub mod proxy;
pub mod route;
pub mod runtime;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod weak;
