//! The data path: listeners, the HTTP server, and the request pipeline.

pub mod capture;
pub mod error;
pub mod handler;
pub mod server;

pub use error::ProxyError;
pub use handler::{ConnInfo, ProxyState};
pub use server::ListenerManager;
