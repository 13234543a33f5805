//! chatd under systemd's protocols, driven by systemd's own `systemd-socket-activate`: the
//! listening socket is inherited (LISTEN_FDS, fd 3), and READY/STATUS/WATCHDOG/STOPPING
//! messages arrive on a notify socket this test listens on.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, model_dir};

/// A hang detector: what these tests wait for normally comes within seconds.
const HANG: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Messages received on the notify socket until `until` matches one (or the timeout).
fn receive_until(socket: &UnixDatagram, timeout: Duration, mut until: impl FnMut(&str) -> bool) -> Vec<String> {
    let end = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = until(&message);
            got.push(message);
            if done {
                break;
            }
        }
    }
    got
}

#[test]
fn socket_activation_and_the_notify_protocol() {
    let Ok(activate) = which("systemd-socket-activate") else {
        panic!("systemd-socket-activate is needed (Debian package systemd)");
    };
    let dir = std::env::temp_dir().join(format!("chatd-systemd-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let notify_path = dir.join("notify");
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();

    let (d, port, reply) = activated(&activate, &notify_path);
    assert!(reply.starts_with("HTTP/1.1 200"), "the connection that started chatd: {reply}");
    assert_eq!(d.addr, format!("127.0.0.1:{port}"), "serves the inherited socket");
    assert!(d.log().iter().any(|l| l.contains("on the socket from systemd")), "{:?}", d.log());

    let messages = receive_until(&notify, HANG, |m| m.contains("READY=1"));
    let ready = messages.iter().position(|m| m.contains("READY=1")).expect("READY=1");
    let statuses: Vec<&String> = messages.iter().filter(|m| m.contains("STATUS=")).collect();
    assert!(statuses.iter().any(|m| m.contains("STATUS=loading model")), "{messages:?}");
    assert!(statuses.iter().any(|m| m.contains("STATUS=warming up")), "{messages:?}");
    assert!(messages[ready].contains("STATUS=ready: serving"), "{messages:?}");

    // The engine loop pings the watchdog while idle (every WATCHDOG_USEC / 2): three pings come.
    let mut pings = 0;
    let messages = receive_until(&notify, HANG, |m| {
        pings += usize::from(m.contains("WATCHDOG=1"));
        pings >= 3
    });
    assert!(pings >= 3, "{messages:?}");

    // Asleep after 2 s without requests: the main loop pings the watchdog instead.
    let messages = receive_until(&notify, HANG, |m| m.contains("STATUS=sleeping"));
    assert!(messages.iter().any(|m| m.contains("STATUS=sleeping")), "{messages:?}");
    let mut pings = 0;
    let messages = receive_until(&notify, HANG, |m| {
        pings += usize::from(m.contains("WATCHDOG=1"));
        pings >= 3
    });
    assert!(pings >= 3, "pings while asleep: {messages:?}");

    let reply = d.post(
        "/v1/chat/completions",
        &serde_json::json!({"messages": common::user("What is the capital of France?"), "max_tokens": 8}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let messages = receive_until(&notify, HANG, |m| m.contains("STATUS=ready"));
    assert!(messages.iter().any(|m| m.contains("STATUS=waking")), "the request woke it: {messages:?}");

    d.signal(libc::SIGTERM);
    let messages = receive_until(&notify, HANG, |m| m.contains("STOPPING=1"));
    assert!(messages.iter().any(|m| m.contains("STOPPING=1") && m.contains("STATUS=draining")), "{messages:?}");
    let status = d.wait_exit(HANG).expect("chatd exits");
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// chatd started by `systemd-socket-activate` on a free port (tried again on another if, between
/// finding it free and binding it, something else took it), the port, and the reply to the
/// request on the connection that started it.
fn activated(activate: &std::path::Path, notify_path: &std::path::Path) -> (Daemon, u16, String) {
    for _ in 0..3 {
        let port = free_port();
        let mut cmd = Command::new(activate);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
            .arg("--setenv=WATCHDOG_USEC=400000")
            .arg(env!("CARGO_BIN_EXE_chatd"))
            .arg("--model")
            .arg(model_dir())
            // Ignored: the inherited socket wins.
            .args(["--listen", "127.0.0.1:1", "--threads", "2", "--shutdown-timeout-s", "1"])
            .args(["--idle-unload-s", "2"]);
        // systemd-socket-activate waits for the first connection before it starts chatd; the
        // request on that connection is answered once the model is loaded, not refused.
        let first = std::thread::spawn(move || first_request(port));
        match Daemon::try_launch(cmd, true) {
            Ok(d) => return (d, port, first.join().unwrap()),
            Err(log) if log.contains("Address already in use") => continue,
            Err(log) => panic!("chatd did not start:\n{log}"),
        }
    }
    panic!("three free ports were taken before systemd-socket-activate could bind them");
}

/// The reply to a chat request on the first connection to `port` that succeeds (or "").
fn first_request(port: u16) -> String {
    let end = Instant::now() + HANG;
    while Instant::now() < end {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let body = r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}"#;
            let head = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.set_read_timeout(Some(HANG)).unwrap();
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(body.as_bytes()).unwrap();
            let mut reply = String::new();
            let _ = stream.read_to_string(&mut reply);
            return reply;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    String::new()
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.exists())
        .ok_or(())
}

#[test]
fn units_verify_and_score_safe_and_the_example_config_loads() {
    let analyze = which("systemd-analyze").expect("systemd-analyze is needed (Debian package systemd)");
    let dir = std::env::temp_dir().join(format!("chatd-units-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // As scripts/install.sh does, with the binary where this build put it.
    for unit in ["chatd.service", "chatd.socket"] {
        let text = std::fs::read_to_string(format!("{}/systemd/{unit}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        std::fs::write(dir.join(unit), text.replace("/usr/local/bin/chatd", env!("CARGO_BIN_EXE_chatd"))).unwrap();
    }
    let service = dir.join("chatd.service");
    let verify = Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(&service)
        .arg(dir.join("chatd.socket"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr).into_owned() + &String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    let security = Command::new(&analyze).args(["security", "--offline=true"]).arg(&service).output().unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for chatd.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(score < 3.0, "exposure {score}:\n{report}");

    let example = format!("{}/systemd/chatd.toml", env!("CARGO_MANIFEST_DIR"));
    let check = Command::new(env!("CARGO_BIN_EXE_chatd"))
        .args(["--config", &example, "--check-config", "--model"])
        .arg(model_dir())
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
