//! Secret masking of build output: every occurrence of a secret becomes `****` before
//! a byte of it is spooled or sent.
//!
//! Why here and in this shape: the output of a build reaches disk (the spool) and the
//! wire in chunks of whatever size a pipe read returned, so a secret can be split
//! across two chunks, or be the last bytes before a long pause. A [`Masker`] therefore
//! holds back a *carry*: the shortest tail of what it was given that could still be the
//! start of a secret. The carry is at most one byte shorter than the longest form, and
//! the owner releases it with [`Masker::flush`] once the stream has been quiet for a
//! bounded delay (or at its end), so output without a newline is never held forever.
//! What a flush lets out is a strict prefix of a secret, never a whole one.
//!
//! Each secret is searched for in the forms a build is likely to print it in:
//! - literally;
//! - shell-quoted, as `sh -x`/`set -x` traces print it (`'` written `'\''`) and as
//!   `printf %q` does (a backslash before each character the shell treats specially);
//! - base64, in each of the three alignments the secret can have inside a longer
//!   encoded text (only the characters that depend on the secret's bytes alone; a
//!   `docker login` config or a basic-auth header carries them).
//!
//! At each position the longest form that matches wins, and matching goes on after it
//! (leftmost, then longest). Secrets shorter than [`MIN_SECRET_LEN`] bytes are refused:
//! masking `ab` would blank every word that holds those letters and tell a reader which
//! letters the secret has.

use base64::Engine as _;

/// The replacement of every occurrence of a secret.
pub const MASK: &[u8] = b"****";

/// The shortest secret tether masks: see the module doc.
pub const MIN_SECRET_LEN: usize = 4;

/// The shortest base64 fragment searched for: shorter ones would match ordinary text.
const MIN_BASE64_FRAGMENT: usize = 4;

/// Why a set of secrets cannot be masked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaskError {
    /// The value of the secret named is too short to be masked without blanking
    /// ordinary output (the value itself is never part of the error).
    #[error("secret {name:?} is {len} bytes long; secrets must be at least {MIN_SECRET_LEN} bytes to be masked")]
    TooShort { name: String, len: usize },
}

/// The forms of a set of secrets, longest first: what a [`Masker`] searches for.
#[derive(Clone, Default)]
pub struct Secrets {
    /// Distinct forms, longest first (ties broken bytewise, so the order is stable).
    forms: Vec<Vec<u8>>,
    /// `first[b]`: some form starts with byte `b` (a quick skip for most positions).
    first: Vec<bool>,
}

impl std::fmt::Debug for Secrets {
    /// Never the values: only how many forms there are.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").field("forms", &self.forms.len()).finish()
    }
}

impl Secrets {
    /// The forms of `secrets`, given as `(name, value)`; refuses a value shorter than
    /// [`MIN_SECRET_LEN`] (naming it, never showing it).
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Self, MaskError> {
        let mut forms = Vec::new();
        for (name, value) in secrets {
            if value.len() < MIN_SECRET_LEN {
                return Err(MaskError::TooShort {
                    name: name.to_owned(),
                    len: value.len(),
                });
            }
            forms.extend(forms_of(value));
        }
        forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        forms.dedup();
        let mut first = vec![false; 256];
        for f in &forms {
            first[usize::from(f[0])] = true;
        }
        Ok(Secrets { forms, first })
    }

    /// No secrets: output passes through untouched.
    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    /// The forms searched for, longest first.
    pub fn forms(&self) -> &[Vec<u8>] {
        &self.forms
    }

    /// The longest form matching completely at the start of `s`.
    fn complete_at(&self, s: &[u8]) -> Option<usize> {
        self.forms.iter().find(|f| s.starts_with(f)).map(Vec::len)
    }

    /// Whether `s` (shorter than some form) is a strict prefix of a form: more input
    /// could still complete a match there.
    fn may_grow(&self, s: &[u8]) -> bool {
        self.forms.iter().any(|f| f.len() > s.len() && f.starts_with(s))
    }
}

/// The forms of one secret (see the module doc), the literal first.
fn forms_of(value: &[u8]) -> Vec<Vec<u8>> {
    let mut forms = vec![value.to_vec()];
    // `'` inside single quotes, as sh -x prints it.
    if value.contains(&b'\'') {
        forms.push(replace_all(value, b"'", b"'\\''"));
    }
    // printf %q: a backslash before each character special to the shell.
    if value.iter().any(|&b| is_shell_special(b)) {
        let mut escaped = Vec::with_capacity(value.len() * 2);
        for &b in value {
            if is_shell_special(b) {
                escaped.push(b'\\');
            }
            escaped.push(b);
        }
        forms.push(escaped);
    }
    forms.extend(base64_fragments(value));
    forms
}

fn is_shell_special(b: u8) -> bool {
    b" \t'\"\\$`!&|;<>()[]{}*?#~".contains(&b)
}

fn replace_all(s: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// The base64 characters that depend on `value`'s bytes alone, for each of the three
/// offsets (mod 3) at which it can start inside a longer encoded text.
fn base64_fragments(value: &[u8]) -> Vec<Vec<u8>> {
    let engine = base64::engine::general_purpose::STANDARD_NO_PAD;
    (0..3usize)
        .filter_map(|k| {
            let mut shifted = vec![0u8; k];
            shifted.extend_from_slice(value);
            let encoded = engine.encode(&shifted).into_bytes();
            // Character j covers bits [6j, 6j + 6); the secret covers [8k, 8(k + n)).
            let start = (8 * k).div_ceil(6);
            let end = (8 * (k + value.len())) / 6;
            (end >= start + MIN_BASE64_FRAGMENT).then(|| encoded[start..end].to_vec())
        })
        .collect()
}

/// Masks one output stream (see the module doc): feed it chunks with [`Masker::push`],
/// release what it holds back with [`Masker::flush`].
#[derive(Debug, Clone)]
pub struct Masker {
    secrets: Secrets,
    carry: Vec<u8>,
}

impl Masker {
    pub fn new(secrets: Secrets) -> Self {
        Masker {
            secrets,
            carry: Vec::new(),
        }
    }

    /// Masks `chunk` (after what was held back) into `out`; keeps back the tail that
    /// could be the start of a secret.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.secrets.is_empty() {
            out.extend_from_slice(chunk);
            return;
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let kept = self.mask(&buf, false, out);
        self.carry = buf.split_off(kept);
    }

    /// Releases what is held back (masking any secret complete in it): at the end of
    /// the stream, or after it has been quiet for the owner's delay.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        let buf = std::mem::take(&mut self.carry);
        self.mask(&buf, true, out);
    }

    /// How many bytes are held back.
    pub fn pending(&self) -> usize {
        self.carry.len()
    }

    /// Masks `buf` into `out` up to the first position where a longer input could still
    /// complete a match (unless `at_end`), and returns that position.
    fn mask(&self, buf: &[u8], at_end: bool, out: &mut Vec<u8>) -> usize {
        let s = &self.secrets;
        let mut i = 0;
        let mut plain = 0; // start of the bytes not yet copied to `out`
        while i < buf.len() {
            if !s.first[usize::from(buf[i])] {
                i += 1;
                continue;
            }
            let rest = &buf[i..];
            if !at_end && s.may_grow(rest) {
                break;
            }
            match s.complete_at(rest) {
                Some(len) => {
                    out.extend_from_slice(&buf[plain..i]);
                    out.extend_from_slice(MASK);
                    i += len;
                    plain = i;
                }
                None => i += 1,
            }
        }
        out.extend_from_slice(&buf[plain..i]);
        i
    }
}

/// Masks a whole text at once (the chunks of a stream give the same result).
pub fn mask_all(secrets: &Secrets, text: &[u8]) -> Vec<u8> {
    let mut m = Masker::new(secrets.clone());
    let mut out = Vec::with_capacity(text.len());
    m.push(text, &mut out);
    m.flush(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secrets(values: &[&str]) -> Secrets {
        Secrets::new(values.iter().map(|v| ("S", v.as_bytes()))).unwrap()
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn literal_quoted_and_base64_forms_are_masked() {
        let s = secrets(&["hunter2's pw"]);
        assert_eq!(mask_all(&s, b"pw=hunter2's pw!"), b"pw=****!");
        assert_eq!(mask_all(&s, b"+ echo 'hunter2'\\''s pw'"), b"+ echo '****'");
        assert_eq!(mask_all(&s, b"printf hunter2\\'s\\ pw"), b"printf ****");
        let b64 = base64::engine::general_purpose::STANDARD;
        for prefix in ["", "u", "us", "use"] {
            let encoded = b64.encode(format!("{prefix}hunter2's pw."));
            let masked = mask_all(&s, encoded.as_bytes());
            assert!(contains(&masked, MASK), "{prefix:?}: {encoded} -> {masked:?}");
            assert!(masked.len() < encoded.len(), "{prefix:?}: {encoded}");
        }
    }

    #[test]
    fn the_longest_secret_wins_where_two_start() {
        let s = secrets(&["abcd", "abcdefgh"]);
        assert_eq!(mask_all(&s, b"xabcdefghy abcdz"), b"x****y ****z");
    }

    #[test]
    fn a_held_prefix_is_released_by_flush_and_completed_by_more_input() {
        let s = secrets(&["s3cr3t-value"]);
        let mut m = Masker::new(s.clone());
        let mut out = Vec::new();
        m.push(b"token: s3cr", &mut out);
        assert_eq!(out, b"token: ");
        assert_eq!(m.pending(), 4);
        m.push(b"3t-value\n", &mut out);
        assert_eq!(out, b"token: ****\n");
        let mut m = Masker::new(s);
        let mut out = Vec::new();
        m.push(b"no newline s3c", &mut out);
        m.flush(&mut out);
        assert_eq!(out, b"no newline s3c", "a prefix alone is not a secret");
    }

    #[test]
    fn short_secrets_are_refused_without_showing_them() {
        let err = Secrets::new([("TOKEN", b"abc".as_slice())]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("TOKEN") && !text.contains("abc"), "{text}");
        assert!(!format!("{:?}", secrets(&["topsecret"])).contains("topsecret"));
    }

    #[test]
    fn without_secrets_output_passes_untouched() {
        let mut m = Masker::new(Secrets::default());
        let mut out = Vec::new();
        m.push(b"abc", &mut out);
        assert_eq!(out, b"abc");
        assert_eq!(m.pending(), 0);
    }

    /// Every form of `secret`, embedded in noise, split at every boundary.
    #[test]
    fn every_form_is_masked_across_every_chunk_boundary() {
        let secret = "pa$$ w'rd-42";
        let s = secrets(&[secret]);
        for form in s.forms().to_vec() {
            let mut text = b"<<".to_vec();
            text.extend_from_slice(&form);
            text.extend_from_slice(b">>");
            for cut in 0..=text.len() {
                let mut m = Masker::new(s.clone());
                let mut out = Vec::new();
                m.push(&text[..cut], &mut out);
                m.push(&text[cut..], &mut out);
                m.flush(&mut out);
                assert_eq!(
                    out,
                    b"<<****>>",
                    "form {:?} cut at {cut}",
                    String::from_utf8_lossy(&form)
                );
            }
        }
    }

    fn secret_strategy() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9$' /+=_-]{4,24}"
    }

    proptest! {
        /// No form of any secret survives, whatever the surrounding output and however
        /// it is chunked.
        #[test]
        fn no_form_survives_any_chunking(
            values in proptest::collection::vec(secret_strategy(), 1..4),
            pieces in proptest::collection::vec((any::<bool>(), "[a-z $'=+/]{0,12}", 0usize..4), 1..12),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let s = Secrets::new(values.iter().map(|v| ("S", v.as_bytes()))).unwrap();
            let mut text = Vec::new();
            for (with_secret, noise, which) in &pieces {
                text.extend_from_slice(noise.as_bytes());
                if *with_secret {
                    let f = &s.forms()[which % s.forms().len()];
                    text.extend_from_slice(f);
                }
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            let mut m = Masker::new(s.clone());
            let mut out = Vec::new();
            let mut at = 0;
            for c in cuts {
                m.push(&text[at..c], &mut out);
                at = c;
            }
            m.push(&text[at..], &mut out);
            m.flush(&mut out);
            for f in s.forms() {
                prop_assert!(!contains(&out, f), "a form survived: {:?} in {:?}", f, out);
            }
        }

        /// Without a flush in the middle, any chunking gives what the whole text gives.
        #[test]
        fn chunking_does_not_change_the_result(
            value in secret_strategy(),
            text in "[a-zA-Z0-9$' /+=_-]{0,200}",
            cut_a in 0usize..200,
            cut_b in 0usize..200,
        ) {
            let s = Secrets::new([("S", value.as_bytes())]).unwrap();
            let mut text = text.into_bytes();
            text.extend_from_slice(value.as_bytes());
            let (a, b) = (cut_a.min(text.len()), cut_b.min(text.len()));
            let (a, b) = (a.min(b), a.max(b));
            let mut m = Masker::new(s.clone());
            let mut out = Vec::new();
            m.push(&text[..a], &mut out);
            m.push(&text[a..b], &mut out);
            m.push(&text[b..], &mut out);
            m.flush(&mut out);
            prop_assert_eq!(out, mask_all(&s, &text));
        }
    }
}
