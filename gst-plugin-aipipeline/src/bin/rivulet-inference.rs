// SPDX-License-Identifier: MPL-2.0
//! `rivulet-inference`: the inference child of `aipipeline isolation=process`. Started by the
//! element (argument `aipipeline-child`, control socket on fd 3, shared memory on fd 4); not
//! meant to be run by hand.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a != gstaipipeline::child::SUBCOMMAND) {
        eprintln!(
            "usage: {} {} (started by the aipipeline element with isolation=process)",
            gstaipipeline::child::BIN_NAME,
            gstaipipeline::child::SUBCOMMAND
        );
        std::process::exit(2);
    }
    std::process::exit(gstaipipeline::child::run());
}
