//! Pseudo-random helpers the benches share: fixed seeds, so every run
//! measures the same layout.

/// The next xorshift64 draw (state must start non-zero).
pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Shuffles `items` in place (Fisher-Yates), drawing from `rng`, which goes
/// on from where the shuffle left it.
pub fn shuffle(items: &mut [u32], rng: &mut u64) {
    for k in (1..items.len()).rev() {
        items.swap(k, (xorshift(rng) % (k as u64 + 1)) as usize);
    }
}
