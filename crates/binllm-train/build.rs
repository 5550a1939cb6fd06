//! Compiles `csrc/shim.cpp` (the few libtorch calls tch 0.24 does not expose) against the
//! same libtorch headers torch-sys used, and records an rpath to libtorch so test binaries
//! and the CLI find it without LD_LIBRARY_PATH.

fn main() {
    let lib_dir =
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports its libtorch lib dir");
    let root = std::path::Path::new(&lib_dir)
        .parent()
        .expect("libtorch root")
        .to_path_buf();
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/shim.cpp")
        .compile("binllm_shim");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    // Dependents (the CLI) read this as DEP_BINLLM_TORCH_LIBTORCH_LIB for their own rpath.
    println!("cargo:libtorch_lib={lib_dir}");
}
