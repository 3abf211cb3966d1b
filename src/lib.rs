//! rudolph: a Rust implementation of RuDOLPH, the hyper-modal transformer that reads and writes
//! one sequence `[left text | image tokens | right text]`.

pub mod cli;
pub mod config;
pub mod image;
pub mod vae;
pub mod weights;
