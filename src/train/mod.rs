//! Fine-tuning RuDOLPH: PyTorch-exact AdamW, learning-rate schedules, the training step, data,
//! checkpoints and the `rudolph train` loop.

pub mod checkpoint;
pub mod data;
pub mod job;
pub mod optim;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use trainer::{Freeze, MicroBatch, StepLog, TrainOptions, Trainer};
