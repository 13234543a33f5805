//! libchat from C and C++: the examples and a misuse program are compiled with the system
//! `cc`/`c++` against the built libchat.so and libchat.a, and run on the real model.
//!
//! The library comes from the same `cargo build --release` as the daemon (scripts/test.sh);
//! `memcheck_threads_example` (valgrind, ~4 minutes) is ignored here and run by
//! scripts/test-slow.sh.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn genai_model() -> String {
    format!("{ROOT}/../shared/models/smollm2-135m-instruct-genai")
}

fn optimum_model() -> String {
    format!("{ROOT}/../shared/models/smollm2-135m-instruct")
}

/// target/<profile>, where cargo put libchat.so and libchat.a next to this test's deps folder.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

/// A folder for the programs, with libchat.so under its SONAME (libchat.so.0) as an installed
/// copy would have it.
fn work_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let profile = profile_dir();
        for lib in ["libchat.so", "libchat.a"] {
            assert!(profile.join(lib).exists(), "{lib} is missing from {}: run cargo build first", profile.display());
        }
        let dir = profile.join("c-abi-tests");
        let lib = dir.join("lib");
        std::fs::create_dir_all(&lib).expect("creating the test folder");
        for name in ["libchat.so", "libchat.so.0"] {
            let link = lib.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(profile.join("libchat.so"), &link).expect("linking libchat.so");
        }
        dir
    })
}

#[derive(Clone, Copy)]
enum Linking {
    Shared,
    Static,
}

/// Compiles `sources` (relative to the repository) into a program named `name`.
fn compile(compiler: &str, sources: &[&str], name: &str, linking: Linking) -> PathBuf {
    let dir = work_dir();
    let out = dir.join(name);
    let mut cmd = Command::new(compiler);
    if compiler == "c++" {
        cmd.args(["-std=c++17", "-I", &format!("{ROOT}/bindings/cpp")]);
    }
    cmd.args(["-Wall", "-Wextra", "-Werror", "-O1", "-g", "-I", &format!("{ROOT}/include")]);
    cmd.args(sources.iter().map(|s| format!("{ROOT}/{s}"))).arg("-o").arg(&out);
    match linking {
        Linking::Shared => {
            let lib = dir.join("lib");
            cmd.arg(format!("-L{}", lib.display())).arg("-lchat").arg(format!("-Wl,-rpath,{}", lib.display()));
        }
        // What `pkg-config --static --libs libchat` lists.
        Linking::Static => {
            cmd.arg(profile_dir().join("libchat.a")).args(["-lpthread", "-ldl", "-lm"]);
        }
    }
    cmd.arg("-lpthread");
    let output = cmd.output().unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(output.status.success(), "{compiler} failed on {sources:?}:\n{}", String::from_utf8_lossy(&output.stderr));
    out
}

fn run(program: &Path, args: &[&str]) -> Output {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("running {program:?}: {e}"));
    assert!(
        output.status.success(),
        "{program:?} {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a chat example with `--print-response` and checks that the streamed pieces make the
/// response's answer, which names Paris.
fn check_chat_example(program: &Path, model: &str) {
    let output = run(program, &[model, "--print-response"]);
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let (streamed, response) = stdout.trim_end().rsplit_once('\n').expect("the answer, then the response JSON");
    let response: Value = serde_json::from_str(response).expect("the response is JSON");
    let content = response["choices"][0]["message"]["content"].as_str().expect("message content");
    assert_eq!(streamed, content, "the streamed pieces must concatenate to the final text");
    assert!(content.contains("Paris"), "{content}");
    assert_eq!(response["object"], "chat.completion");
    assert!(response["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(matches!(response["choices"][0]["finish_reason"].as_str(), Some("stop" | "length")));
}

#[test]
fn c_example_streams_an_answer_linked_shared_and_static() {
    check_chat_example(&compile("cc", &["examples/c/chat.c"], "chat-c-shared", Linking::Shared), &genai_model());
    check_chat_example(&compile("cc", &["examples/c/chat.c"], "chat-c-static", Linking::Static), &optimum_model());
}

#[test]
fn cpp_example_streams_an_answer_linked_shared_and_static() {
    check_chat_example(&compile("c++", &["examples/cpp/chat.cpp"], "chat-cpp-shared", Linking::Shared), &genai_model());
    check_chat_example(&compile("c++", &["examples/cpp/chat.cpp"], "chat-cpp-static", Linking::Static), &genai_model());
}

#[test]
fn eight_threads_share_one_engine() {
    let program = compile("cc", &["examples/c/threads.c"], "threads", Linking::Shared);
    let output = run(&program, &[&genai_model(), "24"]);
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    for (i, line) in lines.iter().enumerate() {
        let answer = line.strip_prefix(&format!("[{i}] ")).and_then(|l| l.split_once(" -> ")).map(|(_, a)| a);
        assert!(answer.is_some_and(|a| a.trim().len() > 5), "thread {i} got no answer: {line}");
    }
    assert!(lines[0].contains("France") && lines[0].split(" -> ").nth(1).unwrap().contains("Paris"), "{}", lines[0]);
}

#[test]
fn misuse_and_refusals_through_the_c_abi() {
    let program = compile("cc", &["tests/c/abi_errors.c"], "abi_errors", Linking::Shared);
    for mode in ["all", "runtime", "free"] {
        let output = run(&program, &[&genai_model(), mode]);
        assert_eq!(String::from_utf8_lossy(&output.stdout), "ok\n", "mode {mode}");
    }
}

#[test]
fn an_installed_libchat_builds_with_pkg_config() {
    let prefix = work_dir().join("prefix");
    let _ = std::fs::remove_dir_all(&prefix);
    let install = Command::new(format!("{ROOT}/scripts/install.sh")).arg("--prefix").arg(&prefix).output().unwrap();
    assert!(install.status.success(), "install.sh failed:\n{}", String::from_utf8_lossy(&install.stderr));
    // The README's line, verbatim but for the prefix.
    let program = prefix.join("chat");
    let build = Command::new("sh")
        .arg("-c")
        .arg(format!("cc {ROOT}/examples/c/chat.c $(pkg-config --cflags --libs libchat) -o {}", program.display()))
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .unwrap();
    assert!(build.status.success(), "building against the install failed:\n{}", String::from_utf8_lossy(&build.stderr));
    // libchat.so.0 from the prefix, ONNX Runtime from the prefix's lib/chatd (found by libchat).
    let output = Command::new(&program)
        .arg(genai_model())
        .env("LD_LIBRARY_PATH", prefix.join("lib"))
        .env("LD_DEBUG", "files")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("Paris"));
    let loads = String::from_utf8_lossy(&output.stderr);
    let runtime = loads.lines().find(|l| l.contains("file=") && l.contains("libonnxruntime")).unwrap_or_default();
    assert!(runtime.contains(&format!("{}/lib/../lib/chatd/", prefix.display())), "{runtime}");
    let version = Command::new(prefix.join("bin/chatd")).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("chatd {}", env!("CARGO_PKG_VERSION")));
}

/// The threads example under valgrind's memcheck: no invalid reads or writes, no definite
/// leaks. Slow (the model runs ~50x slower), so it is run by scripts/test-slow.sh.
#[test]
#[ignore = "slow: run by scripts/test-slow.sh"]
fn memcheck_threads_example() {
    let program = compile("cc", &["examples/c/threads.c"], "threads-memcheck", Linking::Shared);
    // One ONNX Runtime thread and no worker pool: valgrind runs one thread at a time, and
    // spinning threads would only burn its time.
    // Everything runs ~50x slower: no request may be refused for waiting.
    let config = format!(
        r#"{{"model": "{}", "threads": 1, "workers": 0, "max_queue_wait_s": 3600, "request_timeout_s": 3600}}"#,
        genai_model()
    );
    let output = Command::new("valgrind")
        .args(["--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"])
        .arg(format!("--suppressions={ROOT}/tests/valgrind.supp"))
        .arg(&program)
        .args([config.as_str(), "2"])
        .output()
        .expect("running valgrind (Debian package valgrind)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "memcheck failed ({}):\n{stderr}", output.status);
    assert!(stderr.contains("ERROR SUMMARY: 0 errors"), "{stderr}");
    assert!(stderr.contains("definitely lost: 0 bytes") || stderr.contains("no leaks are possible"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 8);
}
