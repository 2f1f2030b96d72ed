// SPDX-License-Identifier: MPL-2.0
//! Trickle protocol benchmark (being written).
fn main() {}
