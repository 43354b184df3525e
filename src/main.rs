//! The `remora` binary: CLI parsing and process wiring live in `remora::cli`.
#![forbid(unsafe_code)]

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(remora::cli::main_with_args(std::env::args_os()));
}
