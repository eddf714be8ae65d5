//! llama.cpp's backend: initialised once per process, for the worker and for `doctor` alike
//! (llama.cpp refuses a second initialisation).
//!
//! Built with the `dynamic-backends` feature (the boards' packages), llama.cpp's CPU backend is
//! not linked in: it is one shared library per CPU level (`libggml-cpu-armv8.2_2.so`, ...) in
//! `../lib/phi3d` beside the binary, and llama.cpp loads the best one the CPU can run before
//! the backend is initialised. [`cpu_variant`] names the one it picked.

use std::path::PathBuf;

use llama_cpp_2::llama_backend::LlamaBackend;

/// The backend, initialised on first use. Panics with [`load`]'s reason when it cannot be;
/// `serve` and `doctor` call [`load`] first and report that reason instead.
pub fn backend() -> &'static LlamaBackend {
    load().unwrap_or_else(|reason| panic!("{reason}"))
}

/// Loads the backend libraries (with `dynamic-backends`) and initialises llama.cpp, once; the
/// error names the folders searched when no CPU backend could be loaded.
pub fn load() -> Result<&'static LlamaBackend, String> {
    static BACKEND: std::sync::OnceLock<Result<LlamaBackend, String>> = std::sync::OnceLock::new();
    BACKEND
        .get_or_init(|| {
            load_backend_libraries()?;
            LlamaBackend::init().map_err(|err| format!("llama.cpp's backend does not initialise: {err}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The folder the backend libraries are installed in: `../lib/phi3d` from the binary
/// (`/usr/bin/phi3d` → `/usr/lib/phi3d`).
pub fn libraries_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.join("lib").join("phi3d"))
}

#[cfg(feature = "dynamic-backends")]
fn load_backend_libraries() -> Result<(), String> {
    let has_cpu = || {
        // SAFETY: the name is a NUL-terminated string; the registry lookup only reads it.
        !unsafe { llama_cpp_sys_2::ggml_backend_reg_by_name(c"CPU".as_ptr()) }.is_null()
    };
    // Beside the binary first (the package, deploy/build-portable.sh's bundle), then the folder
    // the build left them in (a binary run from target/).
    let mut searched = Vec::new();
    let candidates = libraries_dir().into_iter().chain(llama_cpp_sys_2::BACKENDS_DIR.map(PathBuf::from));
    for dir in candidates {
        if dir.is_dir() {
            llama_cpp_2::llama_backend::load_backends_from_path(&dir);
            if has_cpu() {
                return Ok(());
            }
        }
        searched.push(dir.display().to_string());
    }
    Err(format!(
        "no llama.cpp CPU backend could be loaded from {} (this build picks its CPU kernels at run time: \
         the libggml-cpu-*.so files belong in ../lib/phi3d beside the phi3d binary)",
        if searched.is_empty() { "anywhere (the binary's folder is unknown)".to_owned() } else { searched.join(" or ") }
    ))
}

#[cfg(not(feature = "dynamic-backends"))]
fn load_backend_libraries() -> Result<(), String> {
    Ok(())
}

/// The CPU backend variant llama.cpp picked at run time (`armv8.2_2`, `haswell`, ...), or
/// `None` in a build whose kernels are compiled in (for the CPU it was built for).
pub fn cpu_variant() -> Option<String> {
    if !cfg!(feature = "dynamic-backends") {
        return None;
    }
    load().ok()?;
    // ggml opens every candidate to score it and keeps only the best one mapped.
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    variant_in_maps(&maps)
}

fn variant_in_maps(maps: &str) -> Option<String> {
    maps.lines().find_map(|line| {
        let file = line.rsplit('/').next()?;
        let variant = file.strip_prefix("libggml-cpu-")?.strip_suffix(".so")?;
        Some(variant.to_owned())
    })
}

/// The board, as the device tree names it (`Raspberry Pi 5 Model B Rev 1.0`,
/// `NVIDIA Jetson AGX Orin Developer Kit`); `None` on a machine without a device tree.
pub fn board() -> Option<String> {
    ["/proc/device-tree/model", "/sys/firmware/devicetree/base/model"]
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .map(|model| String::from_utf8_lossy(&model).trim_end_matches('\0').trim().to_owned())
        .filter(|model| !model.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variant_is_the_cpu_library_mapped() {
        let maps = "\
aaaa-bbbb r-xp 00000000 08:01 12 /usr/lib/phi3d/libggml-base.so
cccc-dddd r-xp 00000000 08:01 13 /usr/lib/phi3d/libggml-cpu-armv8.2_2.so
eeee-ffff r-xp 00000000 08:01 14 /usr/lib/phi3d/libllama.so";
        assert_eq!(variant_in_maps(maps).as_deref(), Some("armv8.2_2"));
        assert_eq!(variant_in_maps("aaaa-bbbb r-xp 0 08:01 12 /usr/lib/libggml.so"), None);
    }
}
