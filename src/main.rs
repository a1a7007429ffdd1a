//! The `quant-robust` command line: parses arguments, runs one library call per
//! subcommand, prints the error chain on failure.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    cli::init_logging(args.verbose);
    quant_robust::device::keep_freed_memory();
    quant_robust::device::stop_on_sigterm();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // The chain, each cause once (the library's messages already include their
            // source's text, so a cause that the previous message ends with is skipped).
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.ends_with(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
