//! Placeholder replaced by the codec benchmark (issue 2).
fn main() {}
