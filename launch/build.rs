// SPDX-License-Identifier: MPL-2.0
fn main() {
    // The aipipeline plugin is linked statically and needs libtorch at run time: tch's link
    // arguments do not reach this binary, so set the rpath here (README.md, "Build facts").
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.to_string_lossy());
    }
}
