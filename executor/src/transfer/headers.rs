//! The extension headers of a tar stream, read within bounds.
//!
//! Why this exists: a GNU long name (`L`), a GNU long link (`K`) and a PAX record set
//! (`x`, `g`) are entries whose data describes the entry after them. The `tar` crate
//! reads such data whole into memory before it hands out the entry described, however
//! large the header says it is: a 256 MiB long name costs 256 MiB of daemon memory, and
//! a gzip bomb made of one long name costs gigabytes from a few kilobytes on the wire.
//! [`unpack`](super::unpack) therefore walks the archive raw and gives every extension
//! header to [`Extensions`], which refuses one larger than its limit before reading its
//! data, and combines the rest into the names of the entry they describe, with the
//! precedence the `tar` crate gives them (a GNU long name, then a PAX `path`, then the
//! header's own name; likewise for link targets).

use std::io::Read;

use tar::{EntryType, PaxExtensions};

use super::{shown, UnpackError};

/// Longest entry name or link target an archive may give, in bytes: `PATH_MAX`, which
/// no path the kernel accepts exceeds. A GNU long name may carry one more byte, its NUL.
pub const MAX_NAME_LEN: u64 = 4096;

/// Most bytes of one PAX record set (`x` or `g` header). Real ones hold a few names,
/// times and attributes: a few kilobytes at most.
pub const MAX_PAX_LEN: u64 = 1 << 20;

/// The kinds of extension header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Extension {
    LongName,
    LongLink,
    Pax,
    GlobalPax,
}

impl Extension {
    /// The extension a header of type `kind` is, if it is one.
    pub(super) fn of(kind: EntryType) -> Option<Extension> {
        if kind.is_gnu_longname() {
            Some(Extension::LongName)
        } else if kind.is_gnu_longlink() {
            Some(Extension::LongLink)
        } else if kind.is_pax_local_extensions() {
            Some(Extension::Pax)
        } else if kind.is_pax_global_extensions() {
            Some(Extension::GlobalPax)
        } else {
            None
        }
    }

    fn what(self) -> &'static str {
        match self {
            Extension::LongName => "GNU long name",
            Extension::LongLink => "GNU long link target",
            Extension::Pax => "PAX header",
            Extension::GlobalPax => "global PAX header",
        }
    }

    fn limit(self) -> u64 {
        match self {
            // The name, and the NUL GNU tar ends it with.
            Extension::LongName | Extension::LongLink => MAX_NAME_LEN + 1,
            Extension::Pax | Extension::GlobalPax => MAX_PAX_LEN,
        }
    }
}

/// The names of one entry, after its extension headers.
pub(super) struct Names {
    pub(super) path: Vec<u8>,
    /// The link target: `None` where no header gave one.
    pub(super) link: Option<Vec<u8>>,
}

/// The extension headers read since the last ordinary entry.
#[derive(Default)]
pub(super) struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    /// Reads the data (`size` bytes, as its header declares) of extension header `ext`
    /// from `data`, refusing it before reading when it is larger than allowed. A global
    /// PAX header describes nothing tether applies: it is read (within the same bound)
    /// and dropped.
    pub(super) fn read(&mut self, ext: Extension, data: &mut impl Read, size: u64) -> Result<(), UnpackError> {
        if size > ext.limit() {
            let mut start = Vec::new();
            // Only to name it in the error; a short read shows less.
            let _ = data.take(super::SHOWN_NAME_LEN as u64).read_to_end(&mut start);
            return Err(UnpackError::HeaderTooLarge {
                what: ext.what(),
                size,
                limit: ext.limit(),
                start: shown(&start),
            });
        }
        let twice = || UnpackError::Corrupt {
            entry: "<extension header>".into(),
            reason: format!("two {}s describe the same entry", ext.what()),
        };
        let slot = match ext {
            Extension::LongName => &mut self.long_name,
            Extension::LongLink => &mut self.long_link,
            Extension::Pax => &mut self.pax,
            Extension::GlobalPax => {
                std::io::copy(&mut data.take(size), &mut std::io::sink()).map_err(|e| header_error(ext, &e))?;
                return Ok(());
            }
        };
        if slot.is_some() {
            return Err(twice());
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        data.take(size)
            .read_to_end(&mut bytes)
            .map_err(|e| header_error(ext, &e))?;
        if (bytes.len() as u64) < size {
            return Err(UnpackError::Truncated {
                entry: format!("<{}>", ext.what()),
            });
        }
        *slot = Some(bytes);
        Ok(())
    }

    /// Whether extension headers were read that no entry has taken yet.
    pub(super) fn pending(&self) -> bool {
        self.long_name.is_some() || self.long_link.is_some() || self.pax.is_some()
    }

    /// The names of the ordinary entry described by the headers read so far (whose own
    /// header gives `header_path`, `header_link` and `size`), clearing them for the next.
    pub(super) fn take(
        &mut self,
        header_path: &[u8],
        header_link: Option<&[u8]>,
        size: u64,
    ) -> Result<Names, UnpackError> {
        let long_name = self.long_name.take().map(strip_nul);
        let long_link = self.long_link.take().map(strip_nul);
        let pax = self.pax.take();
        let record = |key: &[u8]| -> Option<Vec<u8>> {
            let pax = pax.as_deref()?;
            PaxExtensions::new(pax)
                .filter_map(Result::ok)
                .find(|r| r.key_bytes() == key)
                .map(|r| r.value_bytes().to_vec())
        };
        let path = long_name
            .or_else(|| record(b"path"))
            .unwrap_or_else(|| header_path.to_vec());
        let link = long_link
            .or_else(|| record(b"linkpath"))
            .or_else(|| header_link.map(<[u8]>::to_vec));
        for (what, name) in [("entry name", Some(&path)), ("link target", link.as_ref())] {
            if let Some(name) = name.filter(|n| n.len() as u64 > MAX_NAME_LEN) {
                return Err(UnpackError::HeaderTooLarge {
                    what,
                    size: name.len() as u64,
                    limit: MAX_NAME_LEN,
                    start: shown(name),
                });
            }
        }
        // The `tar` crate would let a PAX `size` record override the header's size and
        // find the next header where that says; raw iteration goes by the header. Rather
        // than guess which a writer meant, an archive where they differ is refused.
        if let Some(pax_size) = record(b"size") {
            let agrees = std::str::from_utf8(&pax_size).ok().and_then(|s| s.parse::<u64>().ok()) == Some(size);
            if !agrees {
                return Err(UnpackError::Corrupt {
                    entry: shown(&path),
                    reason: format!(
                        "its PAX size record ({}) differs from its header's size ({size}); \
                         files of 8 GiB and more are not supported",
                        shown(&pax_size)
                    ),
                });
            }
        }
        Ok(Names { path, link })
    }
}

/// A GNU long name or link target without the NUL that ends it.
fn strip_nul(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.last() == Some(&0) {
        bytes.pop();
    }
    bytes
}

fn header_error(ext: Extension, e: &std::io::Error) -> UnpackError {
    UnpackError::Corrupt {
        entry: format!("<{}>", ext.what()),
        reason: e.to_string(),
    }
}
