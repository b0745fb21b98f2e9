//! Hostile inputs end to end, as the unprivileged test user: images that try to write
//! outside their tree, lie about their contents or are broken (made by
//! `hostile_images.py`). Each one is refused with one line that names the problem; nothing
//! appears outside the cache, the cache is as it was, and no process or mount is left.
//! Two extreme but valid images (100 000 tiny files, an 8 GiB sparse file) import and run
//! without filling the disk.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_tests::*;

/// Every path under `dir` with its size: what "the cache is as it was" compares.
fn tree_listing(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            // Per-digest lock files are empty and stay by design (removing one would race
            // with a process about to take it); they hold nothing of an image.
            if rel.starts_with("locks/") {
                continue;
            }
            if m.is_dir() {
                stack.push(p);
                out.insert(rel + "/", 0);
            } else {
                out.insert(rel, m.len());
            }
        }
    }
    out
}

struct Case {
    name: String,
    reference: String,
    expect: String,
    ok: bool,
    check: Option<(String, String)>,
}

fn make_cases(dir: &Path) -> Vec<Case> {
    let out = dir.join("cases");
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../launcher/tests/fixtures/sif/one-group.sif");
    assert!(
        fixture.is_file(),
        "SIF fixture {} is missing",
        fixture.display()
    );
    let status = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("hostile_images.py"))
        .arg(&out)
        .arg(image("busybox"))
        .arg(image("busybox.sqsh"))
        .arg(&fixture)
        .status_within(COMMAND_LIMIT);
    assert!(status.success(), "hostile_images.py failed");
    let chown = Command::new("chown")
        .args(["-R", &format!("{USER}:")])
        .arg(&out)
        .status_within(COMMAND_LIMIT);
    assert!(chown.success());
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("cases.json")).unwrap()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().into(),
            reference: c["ref"].as_str().unwrap().into(),
            expect: c["expect"].as_str().unwrap_or("").into(),
            ok: c["ok"].as_bool().unwrap(),
            check: c["check"].as_array().map(|v| {
                (
                    v[0].as_str().unwrap().to_string(),
                    v[1].as_str().unwrap().to_string(),
                )
            }),
        })
        .collect()
}

#[test]
fn hostile_images_are_refused_in_one_line_and_change_nothing() {
    // Alone: it checks the user's processes and the host's mounts.
    let _m = exclusive_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    let cases = make_cases(&dir.path);
    assert!(cases.len() >= 25, "{} cases", cases.len());
    let cache = format!("{d}/cache");
    // A cache that already holds an image: the refused imports must leave it as it is.
    let valid = cases.iter().find(|c| c.name == "absolute-name").unwrap();
    sh(&format!(
        "$FERRY import --cache {cache} {} >/dev/null",
        valid.reference
    ))
    .ok();
    let before_user = live_processes(USER);
    let mounts_before = host_mounts();
    let mut failures = Vec::new();
    for case in cases.iter().filter(|c| !c.ok) {
        let cache_before = tree_listing(Path::new(&cache));
        // A local squashfs or SIF is not imported but run; the same check applies.
        let local = !case.reference.contains(':');
        let command = if local {
            format!("$FERRY run --cache {cache} {} true", case.reference)
        } else {
            format!("$FERRY import --cache {cache} {}", case.reference)
        };
        let out = sh(&command);
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let problem = if out.code == 0 {
            Some("succeeded".to_string())
        } else if lines.len() != 1 {
            Some(format!("{} lines of error", lines.len()))
        } else if !lines[0].contains(&case.expect) {
            Some(format!("no '{}' in the error", case.expect))
        } else {
            None
        };
        if let Some(problem) = problem {
            failures.push(format!("{}: {problem}: {}", case.name, out.stderr.trim()));
        }
        assert_eq!(
            tree_listing(Path::new(&cache)),
            cache_before,
            "{}: the cache changed",
            case.name
        );
        eprintln!("{:28} {}", case.name, lines.first().unwrap_or(&""));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        dir_entries(&format!("{d}/cases/outside")),
        Vec::<String>::new(),
        "an image wrote outside its tree"
    );
    for escaped in ["/var/tmp/escape", "/tmp/escape", "/escape"] {
        assert!(!Path::new(escaped).exists(), "{escaped} was written");
    }
    assert_eq!(
        leftovers_after(USER, Duration::from_secs(5)),
        before_user,
        "processes left"
    );
    assert_eq!(host_mounts(), mounts_before, "mounts left");
}

#[test]
fn extreme_but_valid_images_import_and_run_without_filling_the_disk() {
    let _m = shared_machine();
    let dir = UserDir::new(USER);
    let d = dir.path.display().to_string();
    let cases = make_cases(&dir.path);
    let cache = format!("{d}/cache");
    for case in cases.iter().filter(|c| c.ok) {
        let out = sh(&format!("$FERRY import --cache {cache} {}", case.reference));
        let image = out.ok().trim().to_string();
        let size = std::fs::metadata(&image).unwrap().len();
        if let Some((command, expected)) = &case.check {
            let out = sh(&format!("$FERRY run {image} sh -c '{command}'"));
            assert_eq!(out.ok(), expected, "{}: {}", case.name, out.stderr);
        }
        // The 8 GiB sparse file squashes to almost nothing, and no unpacked copy stays.
        let used: u64 = tree_listing(Path::new(&cache)).values().sum();
        assert!(
            used < 64 << 20,
            "{}: the cache holds {used} bytes (image {size})",
            case.name
        );
        let blocks: u64 = walk_blocks(Path::new(&cache));
        assert!(
            blocks * 512 < 64 << 20,
            "{}: {} bytes on disk",
            case.name,
            blocks * 512
        );
    }
}

fn walk_blocks(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            total += m.blocks();
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}
