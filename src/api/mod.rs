//! The OpenAI API as data: request parsing and validation into engine requests, and engine
//! events shaped into OpenAI responses. Shared by the HTTP server and the C ABI, so both
//! accept exactly the same JSON and fail with the same error classes. No sockets here.

mod compat;
mod constraints;
mod error;
mod follow;
mod frontend;
mod params;
mod reasoning;
mod response;
mod tokens;
pub mod tools;

pub use error::{ApiError, ErrorClass, error_json};
pub use follow::{Ended, follow};
pub use frontend::{Endpoint, Frontend, Limits, ParsedRequest};
pub use response::{Collector, StreamEncoder};
