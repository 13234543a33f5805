//! Startup failures end with one clear line and a non-zero exit, never a panic.

use std::process::Command;

fn chatd(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chatd")).args(args).env_remove("ORT_DYLIB_PATH").output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn model() -> String {
    format!("{}/../shared/models/smollm2-135m-instruct", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn a_missing_runtime_says_what_was_looked_for_and_how_to_install() {
    let (code, err) = chatd(&["--model", &model(), "--onnxruntime", "/nonexistent/libonnxruntime.so"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("/nonexistent/libonnxruntime.so") && err.contains("setup-onnxruntime.sh"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A file that is not ONNX Runtime at all.
    let (code, err) = chatd(&["--model", &model(), "--onnxruntime", "/etc/hostname"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot load ONNX Runtime") && !err.contains("panicked"), "{err}");
}

#[test]
fn a_missing_or_broken_model_folder_is_one_line() {
    let (code, err) = chatd(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("--model") && err.contains("huggingface-cli download"), "{err}");
    let (code, err) = chatd(&["--model", "/nonexistent-model"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    let (code, err) = chatd(&["--model", "/tmp", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 1);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("chatd: ") && last.contains("/tmp/") && !err.contains("panicked"), "{err}");
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let (code, err) = chatd(&["--threads", "many"]);
    assert_eq!(code, 2);
    assert!(err.contains("--threads"), "{err}");
    let (code, out) = {
        let o = Command::new(env!("CARGO_BIN_EXE_chatd")).arg("--help").output().unwrap();
        (o.status.code().unwrap(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert_eq!(code, 0);
    assert!(out.contains("--max-running"));
}

/// Asking a CPU build of ONNX Runtime for a GPU provider must fail at startup with a line that
/// says what is missing, not fall back silently to the CPU. The test names its runtime: the
/// CPU build `scripts/setup-onnxruntime.sh` unpacks from PyPI's `onnxruntime` wheel, not
/// whatever the machine has (which may well have CUDA).
#[test]
fn a_gpu_provider_without_a_gpu_runtime_is_refused_clearly() {
    let cpu_runtime = format!("{}/.runtime/lib/libonnxruntime.so", env!("CARGO_MANIFEST_DIR"));
    if !std::path::Path::new(&cpu_runtime).exists() {
        eprintln!("skipped: no CPU build of ONNX Runtime at {cpu_runtime} (scripts/setup-onnxruntime.sh makes it)");
        return;
    }
    let cpu = ["--onnxruntime", cpu_runtime.as_str()];
    let (code, err) =
        chatd(&[&["--model", &model(), "--provider", "cuda", "--listen", "127.0.0.1:0"][..], &cpu].concat());
    assert_eq!(code, 1, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("cuda:0 execution provider could not be registered") && last.contains("onnxruntime-gpu"),
        "{err}"
    );
    let genai = format!("{}/../shared/models/smollm2-135m-instruct-genai", env!("CARGO_MANIFEST_DIR"));
    let (code, err) = chatd(
        &[&["--model", genai.as_str(), "--provider", "tensorrt:1", "--listen", "127.0.0.1:0"][..], &cpu].concat(),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("CPU provider only"), "{err}");
    let (code, err) = chatd(&["--provider", "gpu"]);
    assert_eq!(code, 2);
    assert!(err.contains("--provider") && err.contains("cuda:N"), "{err}");
}
