//! `codemantle-control-plane`: the server lands with issue 3.
fn main() {
    eprintln!("codemantle-control-plane: not built yet (issue 3)");
    std::process::exit(2);
}
