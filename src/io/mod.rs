//! File formats: [`npy`] (NumPy arrays). Safetensors codebooks and
//! checkpoints live with their types (tokenizer::codebook,
//! backbone::checkpoint).

pub mod npy;
