//! Hex spelling of digests, for messages and command lines.

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn lower_case_pairs() {
        assert_eq!(super::hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(super::hex(&[]), "");
    }
}
