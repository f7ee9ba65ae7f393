//! HMAC-SHA256 truncated to 16 bytes (RFC 2104, truncation as RFC 4868 does).
//!
//! The keyed inner and outer hash states are computed once, when the key is
//! loaded, and cloned for every datagram: that halves the cost of a verify
//! against re-keying each time (see `benches/wire.rs`). The tag comparison is
//! constant-time (`hmac`'s `verify_truncated_left`, built on `subtle`), so a
//! forger cannot learn a valid tag byte by byte from timing.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

use super::MAC_LEN;

type HmacSha256 = Hmac<Sha256>;

/// Shortest key accepted: 128 bits.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key accepted: one SHA-256 block, so the key is never pre-hashed.
pub const MAX_KEY_LEN: usize = 64;

/// A shared secret, ready to sign and verify datagrams.
#[derive(Clone)]
pub struct MacKey {
    keyed: HmacSha256,
}

impl MacKey {
    /// Loads a key of 16 to 64 bytes.
    pub fn new(secret: &[u8]) -> Result<MacKey, MacKeyError> {
        if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&secret.len()) {
            return Err(MacKeyError { len: secret.len() });
        }
        let keyed =
            HmacSha256::new_from_slice(secret).map_err(|_| MacKeyError { len: secret.len() })?;
        Ok(MacKey { keyed })
    }

    /// The 16-byte tag of `signed` (header and body).
    pub fn sign(&self, signed: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.keyed.clone();
        mac.update(signed);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; MAC_LEN];
        tag.copy_from_slice(&full[..MAC_LEN]);
        tag
    }

    /// Whether `tag` is the tag of `signed`, compared in constant time.
    pub fn verify(&self, signed: &[u8], tag: &[u8]) -> bool {
        if tag.len() != MAC_LEN {
            return false;
        }
        let mut mac = self.keyed.clone();
        mac.update(signed);
        mac.verify_truncated_left(tag).is_ok()
    }
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.write_str("MacKey(..)")
    }
}

/// The key is not 16 to 64 bytes long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacKeyError {
    /// The length that was given.
    pub len: usize,
}

impl fmt::Display for MacKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key is {} bytes; it must be {MIN_KEY_LEN} to {MAX_KEY_LEN} bytes",
            self.len
        )
    }
}

impl std::error::Error for MacKeyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_matches_rfc4231_case_2_truncated() {
        // RFC 4231 test case 2 uses a 4-byte key, below our minimum, so the
        // key is padded the way HMAC pads it internally: with zeros up to the
        // block size, which yields the identical MAC.
        let mut key = b"Jefe".to_vec();
        key.resize(MIN_KEY_LEN, 0);
        let mac = MacKey::new(&key).unwrap();
        let tag = mac.sign(b"what do ya want for nothing?");
        assert_eq!(
            tag,
            [
                0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95,
                0x75, 0xc7
            ]
        );
    }

    #[test]
    fn verify_rejects_any_changed_byte_and_wrong_length() {
        let mac = MacKey::new(&[7u8; 32]).unwrap();
        let data = b"header and body";
        let tag = mac.sign(data);
        assert!(mac.verify(data, &tag));
        for i in 0..MAC_LEN {
            let mut bad = tag;
            bad[i] ^= 1;
            assert!(!mac.verify(data, &bad), "flipped byte {i} verified");
        }
        assert!(!mac.verify(data, &tag[..15]));
        assert!(!mac.verify(b"header and bodY", &tag));
        let other = MacKey::new(&[8u8; 32]).unwrap();
        assert!(!other.verify(data, &tag));
    }

    #[test]
    fn key_length_bounds() {
        assert_eq!(MacKey::new(&[0; 15]).unwrap_err().len, 15);
        assert!(MacKey::new(&[0; 16]).is_ok());
        assert!(MacKey::new(&[0; 64]).is_ok());
        assert!(MacKey::new(&[0; 65]).is_err());
    }
}
