//! COCO run-length encoding, compatible with pycocotools.
//!
//! Counts run over the mask in column-major order, starting with a run of zeros (possibly empty).
//! The compressed string form is pycocotools' `rleToString`: each count (from the third on, as the
//! difference to the count two before) in 5-bit groups with a continuation bit, offset by 48.

use serde::{Deserialize, Serialize};

/// An uncompressed COCO RLE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rle {
    /// `[height, width]`, as COCO writes it.
    pub size: [u32; 2],
    /// Alternating run lengths, zeros first.
    pub counts: Vec<u32>,
}

/// Why an RLE could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RleError {
    /// Runs do not add up to height * width.
    #[error("RLE runs cover {covered} pixels, the {height}x{width} mask has {expected}")]
    Length {
        /// Sum of the runs.
        covered: u64,
        /// height * width.
        expected: u64,
        /// Mask height.
        height: u32,
        /// Mask width.
        width: u32,
    },
    /// A compressed string with a byte outside the alphabet or a dangling group.
    #[error("malformed compressed RLE string at byte {0}")]
    Malformed(usize),
}

impl Rle {
    /// Encode a row-major binary mask (`0` = background, anything else = object).
    pub fn encode(mask: &[u8], width: u32, height: u32) -> Rle {
        let (w, h) = (width as usize, height as usize);
        let mut counts = Vec::new();
        let mut current = 0u8;
        let mut run = 0u32;
        for x in 0..w {
            for y in 0..h {
                let v = u8::from(mask.get(y * w + x).copied().unwrap_or(0) != 0);
                if v != current {
                    counts.push(run);
                    run = 0;
                    current = v;
                }
                run += 1;
            }
        }
        counts.push(run);
        Rle {
            size: [height, width],
            counts,
        }
    }

    /// Decode to a row-major mask of 0/1 bytes.
    pub fn decode(&self) -> Result<Vec<u8>, RleError> {
        let [h, w] = self.size;
        let expected = u64::from(h) * u64::from(w);
        let covered: u64 = self.counts.iter().map(|&c| u64::from(c)).sum();
        if covered != expected {
            return Err(RleError::Length {
                covered,
                expected,
                height: h,
                width: w,
            });
        }
        let (w, h) = (w as usize, h as usize);
        let mut mask = vec![0u8; w * h];
        let mut pos = 0usize;
        for (i, &c) in self.counts.iter().enumerate() {
            if i % 2 == 1 {
                for p in pos..pos + c as usize {
                    let (x, y) = (p / h, p % h);
                    mask[y * w + x] = 1;
                }
            }
            pos += c as usize;
        }
        Ok(mask)
    }

    /// Number of object pixels.
    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&c| u64::from(c))
            .sum()
    }

    /// pycocotools' compressed string form.
    pub fn to_compressed(&self) -> String {
        let mut out = String::new();
        for (i, &c) in self.counts.iter().enumerate() {
            let mut x = i64::from(c);
            if i > 2 {
                x -= i64::from(self.counts[i - 2]);
            }
            loop {
                let mut group = (x & 0x1f) as u8;
                x >>= 5;
                let more = if group & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    group |= 0x20;
                }
                out.push(char::from(group + 48));
                if !more {
                    break;
                }
            }
        }
        out
    }

    /// Parse pycocotools' compressed string form.
    pub fn from_compressed(s: &str, width: u32, height: u32) -> Result<Rle, RleError> {
        let bytes = s.as_bytes();
        let mut counts: Vec<u32> = Vec::new();
        let mut p = 0usize;
        while p < bytes.len() {
            let mut x: i64 = 0;
            let mut k = 0u32;
            loop {
                let b = *bytes.get(p).ok_or(RleError::Malformed(p))?;
                if !(48..48 + 64).contains(&b) || k >= 12 {
                    return Err(RleError::Malformed(p));
                }
                let c = i64::from(b - 48);
                x |= (c & 0x1f) << (5 * k);
                p += 1;
                k += 1;
                if c & 0x20 == 0 {
                    if c & 0x10 != 0 {
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
            }
            let i = counts.len();
            if i > 2 {
                x += i64::from(counts[i - 2]);
            }
            counts.push(u32::try_from(x).map_err(|_| RleError::Malformed(p))?);
        }
        let rle = Rle {
            size: [height, width],
            counts,
        };
        let covered: u64 = rle.counts.iter().map(|&c| u64::from(c)).sum();
        let expected = u64::from(width) * u64::from(height);
        if covered != expected {
            return Err(RleError::Length {
                covered,
                expected,
                height,
                width,
            });
        }
        Ok(rle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_small_mask() {
        // 2x3 (h=2, w=3), row-major:
        // 0 1 1
        // 0 1 0
        let mask = [0, 1, 1, 0, 1, 0];
        let rle = Rle::encode(&mask, 3, 2);
        // column-major: 0,0 | 1,1 | 1,0  -> runs: 2 zeros, 3 ones, 1 zero
        assert_eq!(rle.counts, vec![2, 3, 1]);
        assert_eq!(rle.area(), 3);
        assert_eq!(rle.decode().unwrap(), mask.to_vec());
    }

    #[test]
    fn mask_starting_with_one_has_empty_first_run() {
        // rows (1 0) (1 0): column 0 is all ones.
        let rle = Rle::encode(&[1, 0, 1, 0], 2, 2);
        assert_eq!(rle.counts, vec![0, 2, 2]);
    }

    #[test]
    fn decode_rejects_wrong_length() {
        let rle = Rle {
            size: [2, 2],
            counts: vec![1, 1],
        };
        assert!(matches!(
            rle.decode(),
            Err(RleError::Length {
                covered: 2,
                expected: 4,
                ..
            })
        ));
        assert!(Rle::from_compressed("~~~~", 2, 2).is_err());
        assert!(Rle::from_compressed("0", 2, 2).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(w in 1u32..40, h in 1u32..40, seed in any::<u64>()) {
            let mut state = seed | 1;
            let mask: Vec<u8> = (0..w * h).map(|_| {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                u8::from(state % 5 < 2)
            }).collect();
            let rle = Rle::encode(&mask, w, h);
            prop_assert_eq!(rle.decode().unwrap(), mask.clone());
            let s = rle.to_compressed();
            prop_assert_eq!(Rle::from_compressed(&s, w, h).unwrap(), rle.clone());
            prop_assert_eq!(rle.area(), mask.iter().filter(|&&v| v != 0).count() as u64);
        }
    }
}
