//! The update manifest and its signature: parsed alone, and verified against a key
//! (bytes before the first NUL as the manifest, after it as the signature file). A
//! signature made by the key over the manifest verifies; nothing else parses unsigned.
#![no_main]
use outpost_protocol::update::{
    key_file_text, parse_signing_key, sign_manifest, verify_manifest, Manifest,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = Manifest::parse(data);
    let key = parse_signing_key(&key_file_text("fuzz", &[7u8; 32])).expect("a key");
    let public = key.verifying_key();
    let (manifest, sig) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let _ = verify_manifest(manifest, sig, &public);
    let signed = sign_manifest(manifest, &key);
    match (
        verify_manifest(manifest, signed.as_bytes(), &public),
        Manifest::parse(manifest),
    ) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("signed {:?} but parsed alone {:?}", a.is_ok(), b.is_ok()),
    }
});
