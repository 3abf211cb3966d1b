#![doc = include_str!("../README.md")]

pub mod atomic_file;
pub mod bench;
pub mod builtin;
pub mod config;
pub mod device;
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
pub mod world;

pub use error::{Error, Result};
