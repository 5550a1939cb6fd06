//! With the libtorch engine, give the binary an rpath to the libtorch it was built against
//! (exported by binllm-train), so it runs without LD_LIBRARY_PATH on the build machine.
fn main() {
    if let Ok(dir) = std::env::var("DEP_BINLLM_TORCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
