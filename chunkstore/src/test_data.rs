//! Test data shared by the chunk store's unit tests. Test builds only.

/// `len` bytes from a xorshift generator seeded with `seed`: incompressible,
/// the same for the same seed.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
