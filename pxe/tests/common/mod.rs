//! Shared by the integration tests.

/// `n` bytes of a xorshift sequence from `seed` (made odd): file bodies whose every byte counts.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
