//! The mutator: a seeded generator and the edits it makes to valid encodings (bit flips,
//! interesting integers at any offset, cuts, splices, repeats).

use crate::MAX_INPUT;

/// xorshift64*: deterministic, seedable, fast.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)] // an xorshift step, not an Iterator
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 16] = [0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0xffff, 0x1_0000, 0x10_0000, 0x10_0001, 0x7fff_ffff, 0xffff_ffff, 1 << 40, u64::MAX];

/// Mutates `data` in place with 1 to 4 operations; `corpus` feeds splices.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = INTERESTING[rng.below(INTERESTING.len())] as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            3 | 4 if len >= 2 => {
                // An interesting integer, 2, 4 or 8 bytes, either byte order.
                let width = [2usize, 4, 8][rng.below(3)].min(len);
                let i = rng.below(len - width + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())].wrapping_add(rng.below(3) as u64).wrapping_sub(1);
                let bytes = if rng.below(2) == 0 { v.to_le_bytes() } else { v.to_be_bytes() };
                let src = if rng.below(2) == 0 { &bytes[..width] } else { &bytes[8 - width..] };
                data[i..i + width].copy_from_slice(src);
            }
            5 if len > 0 => {
                // Cut a range out.
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16.min(len - a))).min(len);
                data.drain(a..b);
            }
            6 => {
                // Insert random bytes.
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            7 if len > 0 => {
                // Repeat a range (postcard lengths, nested structures).
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64.min(len - a))).min(len);
                let chunk = data[a..b].to_vec();
                let at = rng.below(len + 1);
                for _ in 0..1 + rng.below(4) {
                    data.splice(at..at, chunk.iter().copied());
                }
            }
            8 if len > 0 => data.truncate(rng.below(len)),
            9 if !corpus.is_empty() => {
                // Splice: our head, another seed's tail.
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            _ => {
                // A varint-style length of a random size at a random place.
                let at = rng.below(len + 1);
                let mut v = INTERESTING[rng.below(INTERESTING.len())];
                let mut bytes = Vec::new();
                while v >= 0x80 {
                    bytes.push(v as u8 | 0x80);
                    v >>= 7;
                }
                bytes.push(v as u8);
                data.splice(at..at, bytes);
            }
        }
    }
    data.truncate(MAX_INPUT);
}
