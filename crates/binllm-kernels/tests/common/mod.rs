//! What the kernel tests share: a deterministic generator of weights and activations.

/// SplitMix64: deterministic and dependency-free.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Mostly small values, some negative, some of large magnitude (up to 1e4).
    pub fn activation(&mut self) -> f32 {
        match self.next_u64() % 16 {
            0 => self.unit() * 1e4,
            1 => self.unit() * 1e-3,
            _ => self.unit() * 3.0,
        }
    }
    pub fn activations(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.activation()).collect()
    }
}
