//! nixbase32: the base-32 encoding of store path hashes.
//!
//! Nix's alphabet omits `e`, `o`, `u` and `t` (to avoid accidental words) and, unlike RFC 4648,
//! it emits the *last* 5-bit group first. An encoding of `n` bytes is `ceil(n * 8 / 5)` characters;
//! decoding rejects characters outside the alphabet and non-zero bits beyond the input length, so
//! every byte string has exactly one spelling.

use thiserror::Error;

/// The 32 characters of nixbase32, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Maps an ASCII byte to its digit value, or 0xff for bytes outside the alphabet.
const REVERSE: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Why a nixbase32 string did not decode.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid nixbase32 character {0:?}")]
    InvalidChar(char),
    #[error("nixbase32 string has {0} characters, which is no whole number of bytes")]
    InvalidLength(usize),
    #[error("nixbase32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// Length of the encoding of `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

/// Length of the bytes an encoding of `len` characters decodes to.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

/// Whether `c` is in the nixbase32 alphabet.
#[inline]
pub fn is_valid_char(c: u8) -> bool {
    REVERSE[c as usize] != 0xff
}

/// Encodes `input` as nixbase32.
pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let low = input[i] as u16 >> j;
        let high = if i + 1 < input.len() { (input[i + 1] as u16) << (8 - j) } else { 0 };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes a nixbase32 string.
pub fn decode(input: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let size = decoded_len(input.len());
    if encoded_len(size) != input.len() {
        return Err(DecodeError::InvalidLength(input.len()));
    }
    let mut out = vec![0u8; size];
    for (n, &c) in input.iter().rev().enumerate() {
        let digit = REVERSE[c as usize];
        if digit == 0xff {
            return Err(DecodeError::InvalidChar(c as char));
        }
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= digit << j;
        let carry = ((digit as u16) >> (8 - j)) as u8;
        if i + 1 < size {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(DecodeError::NonZeroPadding);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vectors() {
        // Vectors from Nix: `nix-hash --type sha256 --to-base32` of well-known digests.
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
        let sha256_empty = data_encoding::HEXLOWER
            .decode(b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .unwrap();
        assert_eq!(encode(&sha256_empty), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        let sha256_abc = data_encoding::HEXLOWER
            .decode(b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
            .unwrap();
        assert_eq!(encode(&sha256_abc), "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s");
        assert_eq!(decode(b"1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s").unwrap(), sha256_abc);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode(b"0e"), Err(DecodeError::InvalidChar('e')));
        assert_eq!(decode(b"000"), Err(DecodeError::InvalidLength(3)));
        // Two characters carry 10 bits for one byte: the top two bits must be zero.
        assert_eq!(decode(b"z0"), Err(DecodeError::NonZeroPadding));
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(s.as_bytes()).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(s in "[0-9a-z]{0,60}") {
            let _ = decode(s.as_bytes());
        }
    }
}
