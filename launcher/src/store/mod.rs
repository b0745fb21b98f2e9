//! The content-addressed image cache and the imports that fill it: one squashfs per image
//! digest, written once and shared by every step that uses it.

pub mod cache;
pub mod import;
mod import_progress;
