//! rudolph: a Rust implementation of RuDOLPH, the hyper-modal transformer that reads and writes
//! one sequence `[left text | image tokens | right text]`.

pub mod bench;
pub mod cli;
pub mod config;
pub mod error;
pub mod folder;
pub mod image;
pub mod model;
pub mod pipelines;
pub mod progress;
pub mod sampling;
pub mod tokenizer;
pub mod train;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
