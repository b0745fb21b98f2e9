//! The fuzz smoke run of CI: every fuzz target (`ferry::fuzzing`) gets the committed corpus
//! (`fuzz/corpus/<target>/`) and then deterministic mutations of it for a few seconds. The
//! long runs are libFuzzer's (`integration/fuzz`); this catches regressions on a stable
//! toolchain. A failing input is written to `target/fuzz-failures/` and its path printed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry::fuzzing::{Target, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// xorshift64: the same mutations on every run, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"..",
    b"/",
    b"../",
    b"\0",
    b":",
    b",",
    b"@",
    b"#",
    b"=",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
    b".wh.",
    b".wh..wh..opq",
    b"sha256:",
    b"{}",
    b"[]",
    b"\"",
    b"-1",
    b"18446744073709551615",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            2 if !data.is_empty() => {
                let cut = rng.below(data.len());
                data.truncate(cut);
            }
            3 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                let at = rng.below(data.len() + 1);
                data.splice(at..at, piece.iter().copied());
            }
            4 if !data.is_empty() => {
                let from = rng.below(data.len());
                let len = rng.below(data.len() - from).min(64);
                let chunk = data[from..from + len].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, chunk);
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let at = rng.below(data.len() + 1);
                    data.splice(at..at, other[from..].iter().copied().take(256));
                }
            }
        }
    }
    data
}

fn save_failure(target: &str, data: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{target}-{}",
        ferry::image::digest::sha256_digest(data)
    ));
    std::fs::write(&path, data).unwrap();
    path
}

fn check(target: &Target, data: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| (target.run)(data))).is_err() {
        let path = save_failure(target.name, data);
        panic!(
            "fuzz target {} failed on {} (replay: cargo fuzz run {} {})",
            target.name,
            path.display(),
            target.name,
            path.display()
        );
    }
}

fn smoke(name: &str, budget: Duration) {
    let target = TARGETS.iter().find(|t| t.name == name).expect("target");
    let seeds = corpus(name);
    assert!(!seeds.is_empty(), "the corpus of {name} is empty");
    for seed in &seeds {
        check(target, seed);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < budget {
        let data = mutate(&mut rng, &seeds);
        check(target, &data);
        runs += 1;
    }
    eprintln!("{name}: {} corpus inputs, {runs} mutations", seeds.len());
}

const BUDGET: Duration = Duration::from_secs(3);

#[test]
fn every_target_has_a_corpus_and_a_test() {
    let tested = [
        "reference",
        "mount_specs",
        "options",
        "manifest",
        "layer",
        "sif",
        "archive",
    ];
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    assert_eq!(names, tested);
    for name in names {
        let target = corpus_dir(name);
        assert!(target.is_dir(), "no corpus at {}", target.display());
        let bin =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../fuzz/fuzz_targets/{name}.rs"));
        assert!(bin.is_file(), "no cargo-fuzz target {}", bin.display());
    }
}

#[test]
fn fuzz_reference() {
    smoke("reference", BUDGET);
}

#[test]
fn fuzz_mount_specs() {
    smoke("mount_specs", BUDGET);
}

#[test]
fn fuzz_options() {
    smoke("options", BUDGET);
}

#[test]
fn fuzz_manifest() {
    smoke("manifest", BUDGET);
}

#[test]
fn fuzz_layer() {
    smoke("layer", BUDGET);
}

#[test]
fn fuzz_sif() {
    smoke("sif", BUDGET);
}

#[test]
fn fuzz_archive() {
    smoke("archive", BUDGET);
}
