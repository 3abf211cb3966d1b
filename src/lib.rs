//! RuDOLPH in Rust: one GPT-style decoder over `[left text | image codes | right text]` that
//! writes texts, draws pictures, captions them, reranks its own candidates and classifies
//! zero-shot, number for number as the original Python library (rudolph 0.0.1rc1).
//!
//! ```rust,no_run
//! use candle_core::{DType, Device};
//! use rudolph::folder::{Loaded, ModelSpec};
//! use rudolph::pipelines::{GenerateOptions, defaults, images};
//!
//! let spec = ModelSpec { dir: Some(rudolph::builtin::dir()?), ..Default::default() };
//! let m = Loaded::load(&spec, &Device::Cpu, DType::F32)?;
//! let opts = GenerateOptions::new(defaults::IMAGE);
//! let text = "большая красная звезда слева на белом фоне";
//! let ranked = images::generate_images(&m.model, &m.tokenizer, text, 8, None, &opts)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modules, from the bottom up:
//!
//! | module | holds |
//! | --- | --- |
//! | [`kernels`] | the computations the models are made of, and the CPU's instruction sets |
//! | [`weights`] | reading and writing checkpoints (PyTorch pickles, safetensors) |
//! | [`config`] | the transformer's configuration and presets |
//! | [`tokenizer`] | the YouTokenToMe BPE tokenizer, and training one |
//! | [`model`] | the RuDOLPH transformer, its masks, cache and loss |
//! | [`vae`] | the VQGAN that turns pictures into codes and back |
//! | [`sampling`] | choosing the next token as the original does |
//! | [`pipelines`] | the tasks: texts, pictures, captions, reranking, classification |
//! | [`batching`] | many callers' generations decoded in one shared batch |
//! | [`serve`] | the OpenAI-compatible HTTP server over the pipelines |
//! | [`folder`] | a model folder of original files, loaded as a whole |
//! | [`train`] | fine-tuning and training |
//! | [`world`], [`builtin`] | the procedural shapes world and the built-in model trained on it |
//! | [`image`], [`progress`], [`bench`](mod@bench), [`device`], [`atomic_file`], [`error`] | the rest |
//!
//! The user guide is the repository's README and `docs/`.

pub mod atomic_file;
pub mod batching;
pub mod bench;
pub mod builtin;
pub mod config;
pub mod device;
pub mod error;
pub mod folder;
pub mod image;
pub mod kernels;
pub mod model;
pub mod pipelines;
pub mod progress;
pub mod sampling;
pub mod serve;
pub mod text_file;
pub mod tokenizer;
pub mod train;
pub mod vae;
pub mod vocabulary;
pub mod weights;
pub mod world;

pub use error::{Error, Result};

// The README's and the library guide's examples are compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

#[cfg(doctest)]
#[doc = include_str!("../docs/library.md")]
struct LibraryGuideExamples;
