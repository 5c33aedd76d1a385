//! File formats: [`npy`] (NumPy arrays), MXNet's [`recordio`] (insightface's
//! training sets) and the crate's [`safetensors`] writer (deterministic
//! headers, atomic writes). The codebook, network
//! and training-checkpoint formats live with their types
//! (tokenizer::codebook, backbone::checkpoint, train::checkpoint).

pub mod npy;
pub mod recordio;
pub mod safetensors;
