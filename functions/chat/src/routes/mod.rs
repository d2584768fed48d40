pub mod chat;
pub mod completions;
pub mod conversations;
pub mod models;
