//! remora: a service-mesh sidecar proxy that speaks Istio's traffic API.
#![forbid(unsafe_code)]

pub mod config;
