//! `codemantle`: the operator CLI over the HTTP API lands with issue 3.
fn main() {
    eprintln!("codemantle: not built yet (issue 3)");
    std::process::exit(2);
}
