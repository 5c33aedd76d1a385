//! Training: optimizers on the device with PyTorch's update rules
//! ([`optim`]), insightface's learning-rate schedules ([`schedule`]), the
//! training step ([`trainer`]), its checkpoints ([`checkpoint`]), and a
//! whole run from a TOML configuration ([`config`], [`mod@run`]: `gif-fr
//! train`).

pub mod checkpoint;
pub mod config;
pub mod optim;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use config::TrainConfig;
pub use optim::{GroupConfig, Optimizer, OptimizerKind, ParamRef};
pub(crate) use run::device;
pub use run::{open_dataset, run, run_on, RunOptions, RunSummary};
pub use schedule::Schedule;
pub use trainer::{median, HeadMemory, StepProfile, TrainHead, TrainMetrics, Trainer, TrainerConfig};
