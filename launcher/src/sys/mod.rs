//! The operating system seam: the system calls ferry makes with care (through `rustix`
//! where it has them; every `unsafe` of the launcher is in [`raw`], with its reason) and
//! child processes handled by pidfd.

pub mod child;
pub mod proc;
pub mod raw;
