//! The `kubenet` binary. Everything it does is the library's ([`kubenet::main`]).

fn main() -> std::process::ExitCode {
    kubenet::main()
}
