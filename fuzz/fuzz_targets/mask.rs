//! Secret masking of arbitrary output, cut into arbitrary chunks: no form of any secret
//! (literal, shell-quoted, base64 in each alignment) survives in what is let out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_executor::mask::{Masker, Secrets, MASK};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|input: (Vec<Vec<u8>>, Vec<u8>, Vec<u16>)| {
    let (values, text, cuts) = input;
    // Secrets never hold the mask's own byte: a secret made of `*` would be "found"
    // again in the masks themselves.
    let values: Vec<Vec<u8>> = values.into_iter().take(4).filter(|v| !v.contains(&MASK[0])).collect();
    let Ok(secrets) = Secrets::new(values.iter().map(|v| ("S", v.as_slice()))) else {
        return;
    };
    if secrets.forms().iter().any(|f| f.contains(&MASK[0])) {
        return;
    }
    // The text with every form planted once, so the interesting case is always there.
    let mut planted = text.clone();
    for f in secrets.forms() {
        planted.extend_from_slice(f);
        planted.extend_from_slice(&text[..text.len().min(3)]);
    }
    let mut cuts: Vec<usize> = cuts.into_iter().map(|c| usize::from(c).min(planted.len())).collect();
    cuts.sort_unstable();
    let mut masker = Masker::new(secrets.clone());
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts {
        masker.push(&planted[at..c], &mut out);
        at = c;
    }
    masker.push(&planted[at..], &mut out);
    masker.flush(&mut out);
    for f in secrets.forms() {
        assert!(!contains(&out, f), "a form of a secret survived");
    }
});
