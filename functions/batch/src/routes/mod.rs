pub mod batch;
pub mod jobs;
pub mod long_text;
