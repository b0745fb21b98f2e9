//! Reading one exported `u32` (Slurm's `plugin_version`) from a shared object without
//! loading it: dlopen would run the plugin's constructors inside `ferry`, and a plugin built
//! for another Slurm may not even link here. Only 64-bit little-endian ELF (the platforms
//! Slurm and ferry run on); every offset in the file is checked, since the file may be
//! anything an admin pointed plugstack.conf at.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    Unsupported,
    #[error("damaged ELF file: {0}")]
    Damaged(&'static str),
    #[error("it exports no symbol `{0}`")]
    NoSymbol(String),
    #[error("its symbol `{name}` is {size} bytes, not 4")]
    WrongSize { name: String, size: u64 },
}

const SHT_SYMTAB: u32 = 2;
const SHT_DYNSYM: u32 = 11;
const SHT_NOBITS: u32 = 8;
const SHN_UNDEF: u16 = 0;
const SHN_LORESERVE: u16 = 0xff00;
const SECTION_HEADER_SIZE: usize = 64;
const SYMBOL_SIZE: usize = 24;

fn slice<'a>(bytes: &'a [u8], at: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let end = at.checked_add(len).ok_or(ElfError::Damaged(what))?;
    if end > bytes.len() as u64 {
        return Err(ElfError::Damaged(what));
    }
    Ok(&bytes[at as usize..end as usize])
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

struct Section {
    kind: u32,
    addr: u64,
    offset: u64,
    size: u64,
    link: u32,
}

fn sections(bytes: &[u8]) -> Result<Vec<Section>, ElfError> {
    let header = slice(bytes, 0, 64, "truncated header")?;
    if &header[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    // EI_CLASS 2 = 64-bit, EI_DATA 1 = little-endian.
    if header[4] != 2 || header[5] != 1 {
        return Err(ElfError::Unsupported);
    }
    let shoff = u64_at(header, 0x28);
    let shentsize = u16_at(header, 0x3a) as usize;
    let shnum = u16_at(header, 0x3c) as u64;
    if shentsize != SECTION_HEADER_SIZE {
        return Err(ElfError::Damaged("odd section header size"));
    }
    let table = slice(
        bytes,
        shoff,
        shnum * SECTION_HEADER_SIZE as u64,
        "section headers",
    )?;
    Ok(table
        .chunks_exact(SECTION_HEADER_SIZE)
        .map(|h| Section {
            kind: u32_at(h, 4),
            addr: u64_at(h, 16),
            offset: u64_at(h, 24),
            size: u64_at(h, 32),
            link: u32_at(h, 40),
        })
        .collect())
}

/// The value of the 4-byte symbol `name` (looked up in the dynamic symbol table, then the
/// full one) as stored in the file.
pub fn read_u32_symbol(bytes: &[u8], name: &str) -> Result<u32, ElfError> {
    let sections = sections(bytes)?;
    for kind in [SHT_DYNSYM, SHT_SYMTAB] {
        for table in sections.iter().filter(|s| s.kind == kind) {
            let strings = sections
                .get(table.link as usize)
                .ok_or(ElfError::Damaged("symbol names"))?;
            let names = slice(bytes, strings.offset, strings.size, "symbol names")?;
            let symbols = slice(bytes, table.offset, table.size, "symbol table")?;
            for sym in symbols.chunks_exact(SYMBOL_SIZE) {
                let start = u32_at(sym, 0) as usize;
                let Some(rest) = names.get(start..) else {
                    return Err(ElfError::Damaged("symbol name offset"));
                };
                let sym_name = rest.split(|b| *b == 0).next().unwrap_or_default();
                if sym_name != name.as_bytes() {
                    continue;
                }
                let shndx = u16_at(sym, 6);
                if shndx == SHN_UNDEF || shndx >= SHN_LORESERVE {
                    continue; // an import of the name, not its definition
                }
                let value = u64_at(sym, 8);
                let size = u64_at(sym, 16);
                if size != 4 {
                    return Err(ElfError::WrongSize {
                        name: name.to_string(),
                        size,
                    });
                }
                let home = sections
                    .get(shndx as usize)
                    .ok_or(ElfError::Damaged("symbol section"))?;
                if home.kind == SHT_NOBITS {
                    return Ok(0); // .bss: zero-initialised, no bytes in the file
                }
                let within = value
                    .checked_sub(home.addr)
                    .filter(|w| w.saturating_add(4) <= home.size)
                    .ok_or(ElfError::Damaged("symbol address"))?;
                let at = home
                    .offset
                    .checked_add(within)
                    .ok_or(ElfError::Damaged("symbol address"))?;
                let b = slice(bytes, at, 4, "symbol value")?;
                return Ok(u32_at(b, 0));
            }
        }
    }
    Err(ElfError::NoSymbol(name.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 shared object: sections [null, .dynsym, .dynstr, .rodata]; `.rodata`
    /// at address 0x1000, file offset `data_at`, holding `value` for each symbol.
    pub(crate) fn tiny_elf(symbols: &[(&str, u32)]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut syms = vec![0u8; SYMBOL_SIZE]; // the null symbol
        let mut data = Vec::new();
        for (name, value) in symbols {
            let mut s = vec![0u8; SYMBOL_SIZE];
            s[0..4].copy_from_slice(&(names.len() as u32).to_le_bytes());
            s[4] = 0x11; // global object
            s[6..8].copy_from_slice(&3u16.to_le_bytes());
            s[8..16].copy_from_slice(&(0x1000 + data.len() as u64).to_le_bytes());
            s[16..24].copy_from_slice(&4u64.to_le_bytes());
            syms.extend(s);
            names.extend(name.as_bytes());
            names.push(0);
            data.extend(value.to_le_bytes());
        }
        let syms_at = 64u64;
        let names_at = syms_at + syms.len() as u64;
        let data_at = names_at + names.len() as u64;
        let shoff = data_at + data.len() as u64;
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        out[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
        out.extend(&syms);
        out.extend(&names);
        out.extend(&data);
        let header = |kind: u32, addr: u64, offset: u64, size: u64, link: u32| {
            let mut h = vec![0u8; 64];
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[16..24].copy_from_slice(&addr.to_le_bytes());
            h[24..32].copy_from_slice(&offset.to_le_bytes());
            h[32..40].copy_from_slice(&size.to_le_bytes());
            h[40..44].copy_from_slice(&link.to_le_bytes());
            h
        };
        out.extend(header(0, 0, 0, 0, 0));
        out.extend(header(SHT_DYNSYM, 0, syms_at, syms.len() as u64, 2));
        out.extend(header(3, 0, names_at, names.len() as u64, 0));
        out.extend(header(1, 0x1000, data_at, data.len() as u64, 0));
        out
    }

    #[test]
    fn reads_the_symbol_value() {
        let elf = tiny_elf(&[("plugin_name", 7), ("plugin_version", 0x160508)]);
        assert_eq!(read_u32_symbol(&elf, "plugin_version"), Ok(0x160508));
        assert_eq!(read_u32_symbol(&elf, "plugin_name"), Ok(7));
        assert_eq!(
            read_u32_symbol(&elf, "plugin"),
            Err(ElfError::NoSymbol("plugin".into()))
        );
    }

    #[test]
    fn refuses_other_files_without_panicking() {
        assert_eq!(
            read_u32_symbol(b"#!/bin/sh\n", "x"),
            Err(ElfError::Damaged("truncated header"))
        );
        assert_eq!(read_u32_symbol(&[b'x'; 100], "x"), Err(ElfError::NotElf));
        let mut elf32 = tiny_elf(&[("v", 1)]);
        elf32[4] = 1;
        assert_eq!(read_u32_symbol(&elf32, "v"), Err(ElfError::Unsupported));
        let elf = tiny_elf(&[("plugin_version", 1)]);
        // Every truncation is an error, never a panic or an out-of-bounds read.
        for len in 0..elf.len() {
            assert!(
                read_u32_symbol(&elf[..len], "plugin_version").is_err(),
                "{len}"
            );
        }
        // Section offsets pointing anywhere.
        for at in 64..elf.len() {
            let mut bad = elf.clone();
            bad[at] ^= 0xff;
            let _ = read_u32_symbol(&bad, "plugin_version");
        }
    }
}
