//! fabricctl (work in progress).
fn main() {}
