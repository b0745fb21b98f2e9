//! Layer compressions, told apart by their magic bytes: gzip, zstd (any number of frames,
//! skippable ones included), or none.

use std::io::{self, BufRead, BufReader, Read};

/// Undo the compression of a layer, recognised by its magic bytes: gzip, zstd, or none.
pub fn decompress<'a, R: Read + 'a>(reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let head = reader.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(ZstdReader::new(reader)))
    } else {
        Ok(Box::new(reader))
    }
}

/// A zstd stream of any number of frames (zstd:chunked layers have many), skippable
/// frames included.
struct ZstdReader<R> {
    source: R,
    decoder: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdReader<R> {
    fn new(source: R) -> Self {
        ZstdReader {
            source,
            decoder: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        use ruzstd::decoding::BlockDecodingStrategy;
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                if self.decoder.can_collect() > 0 {
                    return self.decoder.read(buf);
                }
                if self.decoder.is_finished() {
                    self.in_frame = false;
                    continue;
                }
                self.decoder
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBlocks(1))
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                continue;
            }
            if self.source.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.decoder.init(&mut self.source) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped =
                        io::copy(&mut (&mut self.source).take(length.into()), &mut io::sink())?;
                    if skipped < u64::from(length) {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_layer::{apply, tree, Layer};
    use super::super::LayerError;

    #[test]
    fn compressed_layers() {
        use std::io::Write;
        let (_t, root) = tree();
        let plain = Layer::new().file("gz", b"gzip body", 0o644).bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let plain2 = Layer::new().file("zst", b"zstd body", 0o644).bytes();
        let mut zst = ruzstd::encoding::compress_to_vec(
            &plain2[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        // A skippable frame after the data, as zstd:chunked writes them.
        zst.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 9, 9]);
        let out = apply(&root, &[gz, zst]).unwrap();
        assert_eq!(std::fs::read(root.join("gz")).unwrap(), b"gzip body");
        assert_eq!(std::fs::read(root.join("zst")).unwrap(), b"zstd body");
        assert_eq!(out.stats.entries, 2);
        let e = apply(&root, &[vec![0x1f, 0x8b, 8, 0, 1, 2, 3]]).unwrap_err();
        assert!(matches!(e, LayerError::Read(_)), "{e}");
    }
}
