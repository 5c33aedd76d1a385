//! Training: optimizers on the device with PyTorch's update rules
//! ([`optim`]), insightface's learning-rate schedules ([`schedule`]), the
//! training step ([`trainer`]) and its checkpoints ([`checkpoint`]).

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use optim::{GroupConfig, Optimizer, OptimizerKind, ParamRef};
pub use schedule::Schedule;
pub use trainer::{TrainHead, TrainMetrics, Trainer, TrainerConfig};
