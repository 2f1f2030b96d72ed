// SPDX-License-Identifier: MPL-2.0
fn main() {
    eprintln!("trickle-server: not implemented yet");
    std::process::exit(1);
}
