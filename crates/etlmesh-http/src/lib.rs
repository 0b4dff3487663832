//! HTTP plumbing shared by the mesh's processes, one concern per module: a small JSON
//! client for the control-plane protocol ([`client`]: [`JsonClient`]); the server side —
//! API errors ([`ApiError`]: status, code and JSON answer decided per variant), JSON and
//! metrics answers and request headers ([`respond`]), serving ([`serve`]) and stopping in
//! order ([`shutdown`]); and the log shipper ([`logship`]).

pub mod client;
mod error;
pub mod logship;
pub mod respond;
pub mod serve;
pub mod shutdown;

pub use client::{HttpError, JsonClient};
pub use error::ApiError;
pub use etlmesh_tls::error_chain;
pub use respond::{
    bearer_token, encode_component, json_response, metrics_response, metrics_router, no_delay,
    server_span,
};
