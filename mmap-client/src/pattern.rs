//! Deterministic, position-dependent data patterns.
//!
//! Every byte of test data is a function of a seed and the byte's absolute offset in the file, so
//! a byte that lands at the wrong offset, in the wrong file or at a truncated 32-bit offset is
//! detected, and the offset of the first wrong byte can be reported.

/// One step of the SplitMix64 generator: a cheap, well-mixed 64-bit hash.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The 8 pattern bytes covering offsets `8 * index .. 8 * index + 8`.
fn word(seed: u64, index: u64) -> [u8; 8] {
    splitmix64(splitmix64(seed) ^ index).to_le_bytes()
}

/// The pattern byte at absolute file offset `offset`.
pub fn byte_at(seed: u64, offset: u64) -> u8 {
    word(seed, offset / 8)[(offset % 8) as usize]
}

/// Fill `buf` with the pattern for file offsets `start .. start + buf.len()`.
pub fn fill(seed: u64, start: u64, buf: &mut [u8]) {
    let mut offset = start;
    let mut head = 0;
    while head < buf.len() && !offset.is_multiple_of(8) {
        buf[head] = byte_at(seed, offset);
        head += 1;
        offset += 1;
    }
    let mut chunks = buf[head..].chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&word(seed, offset / 8));
        offset += 8;
    }
    for byte in chunks.into_remainder() {
        *byte = byte_at(seed, offset);
        offset += 1;
    }
}

/// A freshly allocated pattern buffer for file offsets `start .. start + len`.
pub fn generate(seed: u64, start: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    fill(seed, start, &mut buf);
    buf
}

/// A small xorshift generator for reproducible random operation sequences.
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(splitmix64(seed) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_matches_byte_at_for_any_alignment() {
        for start in 0..20u64 {
            let buf = generate(7, start, 37);
            for (i, b) in buf.iter().enumerate() {
                assert_eq!(*b, byte_at(7, start + i as u64));
            }
        }
    }

    #[test]
    fn pattern_depends_on_seed_and_offset() {
        assert_ne!(generate(1, 0, 64), generate(2, 0, 64));
        assert_ne!(generate(1, 0, 64), generate(1, 64, 64));
        assert_ne!(generate(1, 0, 64), generate(1, 1 << 32, 64));
    }
}
