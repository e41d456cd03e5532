//! The compressions a binary cache's NARs come in, as a narinfo's `Compression:` names them.
//!
//! The five that Nix 2.8 writes with its own code (gzip among them) are read and written; zstd is what cairn writes by default (fast to decompress,
//! and what Nix uses for `?compression=zstd`). Decoders keep their input reachable
//! ([`Decoder::into_inner`]) so that a caller hashing the compressed bytes can read the file to
//! its end after the NAR, and check its size and hash.

use std::io::{self, BufRead, Read, Write};

use crate::CacheError;

/// A NAR file's compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
    Gzip,
}

impl Compression {
    /// Parses a narinfo's `Compression:` value (absent means bzip2 in Nix's old caches, but every
    /// Nix since 2.0 writes the field; cairn's narinfo parser defaults it).
    pub fn parse(s: &str) -> Result<Compression, CacheError> {
        Ok(match s {
            "none" | "" => Compression::None,
            "xz" => Compression::Xz,
            "zstd" => Compression::Zstd,
            "bzip2" => Compression::Bzip2,
            "gzip" => Compression::Gzip,
            other => return Err(CacheError::Compression(other.to_owned())),
        })
    }

    /// The narinfo's name of this compression.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Gzip => "gzip",
        }
    }

    /// The file extension Nix gives NARs so compressed (after `.nar`).
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
            Compression::Bzip2 => ".bz2",
            // Nix names no extension for gzip: `nar/HASH.nar`.
            Compression::Gzip => "",
        }
    }

    /// A decoder of this compression over `input`.
    pub fn decoder<R: BufRead>(self, input: R) -> io::Result<Decoder<R>> {
        Ok(match self {
            Compression::None => Decoder::None(input),
            Compression::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(input)?),
            Compression::Xz => Decoder::Xz(liblzma::bufread::XzDecoder::new_multi_decoder(input)),
            Compression::Bzip2 => Decoder::Bzip2(bzip2::bufread::MultiBzDecoder::new(input)),
            Compression::Gzip => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(input)),
        })
    }

    /// An encoder of this compression writing into `out`; `finish` it to flush the end.
    pub fn encoder<W: Write>(self, out: W) -> io::Result<Encoder<W>> {
        self.encoder_at(out, None)
    }

    /// [`Compression::encoder`] at `level` (a binary cache URL's `compression-level`, clamped to
    /// what the format has), or the format's default.
    pub fn encoder_at<W: Write>(self, out: W, level: Option<i32>) -> io::Result<Encoder<W>> {
        let within = |lo: i32, hi: i32, default: i32| level.map_or(default, |l| l.clamp(lo, hi));
        Ok(match self {
            Compression::None => Encoder::None(out),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(out, within(1, 19, 3))?;
                e.include_checksum(true)?;
                Encoder::Zstd(e)
            }
            Compression::Xz => Encoder::Xz(liblzma::write::XzEncoder::new(out, within(0, 9, 6) as u32)),
            Compression::Bzip2 => {
                Encoder::Bzip2(bzip2::write::BzEncoder::new(out, bzip2::Compression::new(within(1, 9, 6) as u32)))
            }
            Compression::Gzip => {
                Encoder::Gzip(flate2::write::GzEncoder::new(out, flate2::Compression::new(within(0, 9, 6) as u32)))
            }
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::parse(s)
    }
}

/// A decompressing reader that gives its input back.
pub enum Decoder<R: BufRead> {
    None(R),
    Zstd(zstd::stream::read::Decoder<'static, R>),
    Xz(liblzma::bufread::XzDecoder<R>),
    Bzip2(bzip2::bufread::MultiBzDecoder<R>),
    Gzip(flate2::bufread::MultiGzDecoder<R>),
}

impl<R: BufRead> Decoder<R> {
    /// The compressed input, positioned after what the decoder consumed.
    pub fn into_inner(self) -> R {
        match self {
            Decoder::None(r) => r,
            Decoder::Zstd(d) => d.finish(),
            Decoder::Xz(d) => d.into_inner(),
            Decoder::Bzip2(d) => d.into_inner(),
            Decoder::Gzip(d) => d.into_inner(),
        }
    }
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::None(r) => r.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::Xz(d) => d.read(buf),
            Decoder::Bzip2(d) => d.read(buf),
            Decoder::Gzip(d) => d.read(buf),
        }
    }
}

/// A compressing writer.
pub enum Encoder<W: Write> {
    None(W),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
    Bzip2(bzip2::write::BzEncoder<W>),
    Gzip(flate2::write::GzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    /// Writes the end of the compressed stream and returns the output.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
            Encoder::Bzip2(e) => e.finish(),
            Encoder::Gzip(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
            Encoder::Bzip2(e) => e.write(buf),
            Encoder::Gzip(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
            Encoder::Bzip2(e) => e.flush(),
            Encoder::Gzip(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Compression; 5] =
        [Compression::None, Compression::Xz, Compression::Zstd, Compression::Bzip2, Compression::Gzip];

    fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        let mut e = c.encoder(Vec::new()).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn names_round_trip() {
        for c in ALL {
            assert_eq!(Compression::parse(c.name()).unwrap(), c);
        }
        assert!(matches!(Compression::parse("lz4"), Err(CacheError::Compression(s)) if s == "lz4"));
    }

    #[test]
    fn bytes_after_the_stream_are_an_error_or_given_back() {
        for c in [Compression::Xz, Compression::Zstd, Compression::Bzip2, Compression::Gzip] {
            let mut file = compress(c, b"the nar");
            file.extend_from_slice(b"TRAILER");
            let mut d = c.decoder(&file[..]).unwrap();
            let mut out = Vec::new();
            // Decoders of concatenated streams read on and refuse what is not one; a decoder
            // that stops at its stream's end gives the rest back to the caller's hash.
            if d.read_to_end(&mut out).is_ok() {
                assert_eq!(out, b"the nar", "{c:?}");
                let mut rest = Vec::new();
                d.into_inner().read_to_end(&mut rest).unwrap();
                assert!(!rest.is_empty() && b"TRAILER".ends_with(&rest), "{c:?}: {rest:?}");
            }
            // Without a trailer, the input is read to its end.
            let file = compress(c, b"the nar");
            let mut d = c.decoder(&file[..]).unwrap();
            d.read_to_end(&mut Vec::new()).unwrap();
            let mut rest = Vec::new();
            d.into_inner().read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for c in [Compression::Xz, Compression::Zstd, Compression::Bzip2] {
            let mut out = Vec::new();
            let r = c.decoder(&b"this is not compressed at all, not even a little"[..]).unwrap().read_to_end(&mut out);
            assert!(r.is_err(), "{c:?} accepted garbage");
        }
    }

    proptest! {
        #[test]
        fn every_compression_round_trips(data in proptest::collection::vec(any::<u8>(), 0..20_000), i in 0usize..4) {
            let c = ALL[i];
            let file = compress(c, &data);
            let mut out = Vec::new();
            c.decoder(&file[..]).unwrap().read_to_end(&mut out).unwrap();
            prop_assert_eq!(out, data);
        }

        #[test]
        fn truncated_streams_fail(data in proptest::collection::vec(any::<u8>(), 1..5_000), i in 1usize..4, cut in 1usize..64) {
            let c = ALL[i];
            let file = compress(c, &data);
            let cut = cut.min(file.len());
            let mut out = Vec::new();
            let r = c.decoder(&file[..file.len() - cut]).unwrap().read_to_end(&mut out);
            prop_assert!(r.is_err() || out != data, "{:?}: a truncated stream decoded in full", c);
        }
    }
}
