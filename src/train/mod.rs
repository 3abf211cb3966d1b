//! Fine-tuning RuDOLPH: the optimizer (and, in later files, data, schedules and the loop).

pub mod optim;
