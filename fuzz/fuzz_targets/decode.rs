//! The decoder on arbitrary bytes, keyless and keyed: it must never panic,
//! and whatever it accepts must be exactly the encoding of a valid message
//! (so nothing that breaks a rule of the protocol is ever accepted).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::wire::{Datagram, MacKey, MAX_DATAGRAM};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Datagram::decode(data, None) {
        let mut out = [0u8; MAX_DATAGRAM];
        let n = d
            .emit(None, &mut out)
            .expect("an accepted datagram re-encodes");
        assert_eq!(&out[..n], data, "accepted a non-canonical datagram");
    }
    let key = MacKey::new(&[7u8; 32]).unwrap();
    if let Ok(d) = Datagram::decode(data, Some(&key)) {
        let mut out = [0u8; MAX_DATAGRAM];
        let n = d
            .emit(Some(&key), &mut out)
            .expect("an accepted datagram re-encodes");
        assert_eq!(&out[..n], data, "accepted a non-canonical keyed datagram");
    }
});
