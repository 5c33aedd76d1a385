//! Training: optimizers on the device with PyTorch's update rules
//! ([`optim`]) and insightface's learning-rate schedules ([`schedule`]).
//! The trainer, checkpoints and `gif-fr train` are the training issue's
//! next parts (not written yet).

pub mod optim;
pub mod schedule;

pub use optim::{GroupConfig, Optimizer, OptimizerKind, ParamRef};
pub use schedule::Schedule;
