//! The tasks of the original library (SPEC §7), each in its own file. Every pipeline has an
//! id-level core (tokens in, tokens/scores out), which the parity tests check against the
//! goldens, and a text/picture-level function on top.

pub mod captions;
pub mod generate;
pub mod images;
pub mod perplexity;
pub mod rerank;
pub mod texts;
