//! The operating system seam: the raw calls no crate wraps safely (every `unsafe` of the
//! launcher is in [`raw`]) and child processes handled by pidfd.

pub mod child;
pub mod raw;
