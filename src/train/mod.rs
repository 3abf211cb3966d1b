//! Fine-tuning RuDOLPH: PyTorch-exact AdamW, learning-rate schedules and the training step.

pub mod optim;
pub mod schedule;
pub mod trainer;

pub use trainer::{Freeze, StepLog, TrainOptions, Trainer};
