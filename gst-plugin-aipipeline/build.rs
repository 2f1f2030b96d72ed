// SPDX-License-Identifier: MPL-2.0
fn main() {
    gst_plugin_version_helper::info();
    // tch's link arguments do not reach our cdylib, tests or binaries: set the rpath ourselves.
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.to_string_lossy());
        // Baked in so the element can dlopen libtorch_cuda.so beside libtorch_cpu.so at run time.
        println!(
            "cargo:rustc-env=RIVULET_LIBTORCH_LIB={}",
            lib.to_string_lossy()
        );
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
