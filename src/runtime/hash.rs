//! The crate's counter-based randomness: a (seed, step) key and a keyed
//! 32-bit hash, the same on the host and in the kernels (kernels/common.cuh
//! `keyed_hash32`), so a device draw (Partial FC's sample, dropout's mask)
//! equals the host's.

/// SplitMix64's finalizer: the (seed, step) mixer.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 64-bit key of step `step` of a run seeded `seed`, as two halves.
pub(crate) fn step_key(seed: u64, step: u64) -> (u32, u32) {
    let z = splitmix64(splitmix64(seed) ^ step);
    (z as u32, (z >> 32) as u32)
}

/// kernels/common.cuh `keyed_hash32`: a bijection of `n` for each key.
pub(crate) fn keyed_hash32(n: u32, a: u32, b: u32) -> u32 {
    let mut x = n ^ a;
    x = x.wrapping_mul(0x9E37_79B1);
    x ^= x >> 16;
    x = x.wrapping_mul(0x85EB_CA6B);
    x ^= x >> 13;
    x = x.wrapping_mul(0xC2B2_AE35);
    x ^= x >> 16;
    x.wrapping_add(b)
}
