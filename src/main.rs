//! chatd: loads a model, starts the engine and serves the OpenAI API over HTTP, telling systemd
//! the truth about its state, until SIGTERM drains it.

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use chat::api::Endpoint;
use chat::config::{Command, Config, changes, usage};
use chat::daemon::activation;
use chat::daemon::notify::Notifier;
use chat::daemon::signals::{self, Signal};
use chat::engine::Heartbeat;
use chat::server::Server;
use chat::service::Service;

fn main() -> ExitCode {
    // First: it takes systemd's variables out of the environment, which is only sound while
    // no other thread (nor any library that may start one) can read it.
    let inherited = activation::inherited_listener();
    // Before any thread starts, so that every thread inherits the blocked mask.
    signals::block();
    chat::memory::cap_allocator_arenas();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match Config::parse(args.clone(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chatd: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match command {
        Command::Help => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("chatd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Check(config) => {
            return match Service::check(&config) {
                Ok(dir) => {
                    let file = config.file.as_ref().map_or("no file".into(), |f| f.display().to_string());
                    println!(
                        "chatd: configuration OK ({file}); model {}, listening on {}",
                        dir.display(),
                        config.server.listen
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("chatd: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Serve(config) => *config,
    };
    // Everything passes env_logger's filter; the level in force is log's max level, which a
    // reload can change.
    env_logger::Builder::new()
        .parse_filters("trace,ort=warn,tiny_http=warn")
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    set_log_level(&config.log_level);
    match serve(config, &args, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn set_log_level(level: &str) {
    log::set_max_level(level.parse().unwrap_or(log::LevelFilter::Info));
}

fn serve(config: Config, args: &[String], inherited: Result<Option<TcpListener>, String>) -> Result<()> {
    let notifier = Arc::new(Notifier::from_env());
    notifier.status("starting");
    // A missing runtime or model folder fails before the port is taken.
    Service::check(&config)?;
    let listener = inherited.map_err(anyhow::Error::msg)?;
    let inherited = listener.is_some();
    // Listen first: while the model loads, /health answers 503 "loading" and requests wait.
    let server = Server::start(config.server.clone(), listener, config.engine.max_queue_wait)?;
    let how = if inherited { "on the socket from systemd " } else { "" };
    log::info!("listening on http://{} {how}(loading the model)", server.local_addr());

    // Signals arrive on their own thread; until the engine is ready, a stop request exits at once.
    let ready = Arc::new(AtomicBool::new(false));
    let (signal_tx, signal_rx) = crossbeam_channel::bounded(8);
    {
        let (ready, notifier) = (ready.clone(), notifier.clone());
        std::thread::Builder::new().name("chatd-signals".into()).spawn(move || {
            loop {
                let signal = signals::wait();
                if signal == Signal::Terminate && !ready.load(Ordering::SeqCst) {
                    notifier.send("STOPPING=1\nSTATUS=stopped while loading");
                    log::info!("stopped while loading");
                    std::process::exit(0);
                }
                if signal_tx.send(signal).is_err() {
                    return;
                }
            }
        })?;
    }

    notifier.status("loading model");
    let mut config = config;
    // The engine loop itself pings the watchdog: a stuck engine stops the pings.
    config.engine.heartbeat = notifier.watchdog().map(|every| {
        let notifier = notifier.clone();
        Heartbeat { every, beat: Arc::new(move || notifier.send("WATCHDOG=1")) }
    });
    let mut service = Some(load(&config, &server, &notifier)?);
    ready.store(true, Ordering::SeqCst);
    let name = service.as_ref().map_or(String::new(), |s| s.frontend.served_name().to_owned());
    notifier.send(&format!("READY=1\nSTATUS=ready: serving {name}, 0 active, 0 queued"));
    log::info!("serving {name} on http://{}", server.local_addr());

    let mut shown = String::new();
    // While the model sleeps this loop feeds the watchdog, so it ticks at least as often.
    let tick = notifier.watchdog().map_or(TICK, |every| (every / 2).min(TICK));
    loop {
        crossbeam_channel::select! {
            recv(signal_rx) -> signal => match signal {
                Ok(Signal::Reload) => reload(args, &server, service.as_ref(), &mut config, &notifier),
                Ok(Signal::Terminate) | Err(_) => break,
            },
            recv(server.wake_calls()) -> _ => {
                if service.is_none() {
                    service = wake(&config, &server, &notifier);
                }
            },
            default(tick) => {
                if service.is_some() && server.release_if_idle(|| service = None) {
                    sleep(&server, &notifier);
                    shown.clear();
                }
                match &service {
                    Some(service) => show_status(service, &name, &mut shown, &notifier),
                    // No engine loop pings the watchdog while the model sleeps.
                    None => notifier.send("WATCHDOG=1"),
                }
            },
        }
    }
    shutdown(&server, service.as_ref(), &notifier);
    Ok(())
}

/// How often the main loop looks at the engine (status, idle).
const TICK: Duration = Duration::from_millis(500);

/// Loads the model, warms it up with one generation and serves it.
fn load(config: &Config, server: &Server, notifier: &Notifier) -> Result<Service> {
    let started = Instant::now();
    let service = Service::load(config)?;
    let load_time = started.elapsed();
    notifier.status("warming up");
    let warm = Instant::now();
    service
        .call(Endpoint::Completion, br#"{"prompt": "Hello", "max_tokens": 1, "temperature": 0}"#, None)
        .map_err(|e| anyhow::anyhow!("the warm-up generation failed: {e}"))?;
    log::info!("warm-up generation took {:.0} ms", warm.elapsed().as_secs_f64() * 1e3);
    server.set_ready(&service, load_time);
    Ok(service)
}

/// The model was released after `idle_unload_s`.
fn sleep(server: &Server, notifier: &Notifier) {
    let idle = server.config().idle_unload.unwrap_or_default().as_secs_f64();
    let mib = chat::memory::resident_bytes() >> 20;
    log::info!("sleeping after {idle:.0} s without requests: the model is released, {mib} MiB resident");
    notifier.status(&format!("sleeping: the model is released ({mib} MiB resident); the next request loads it"));
}

/// A request found the model asleep: load it again, for that request and the ones after it.
fn wake(config: &Config, server: &Server, notifier: &Notifier) -> Option<Service> {
    log::info!("a request came: loading the model again");
    notifier.status("waking: loading the model");
    match load(config, server, notifier) {
        Ok(service) => Some(service),
        Err(e) => {
            log::error!("loading the model again failed: {e:#}");
            notifier.status(&format!("sleeping: loading the model again failed: {e:#}"));
            server.set_load_failed(format!("{e:#}"));
            None
        }
    }
}

/// Tells systemd how busy the engine is, when that changed.
fn show_status(service: &Service, name: &str, shown: &mut String, notifier: &Notifier) {
    let stats = service.engine.stats().snapshot();
    let status = format!("ready: serving {name}, {} active, {} queued", stats.running, stats.queued);
    if status != *shown {
        notifier.status(&status);
        *shown = status;
    }
}

/// SIGHUP: reads the configuration again and applies what can change while running.
/// A sleeping model gets the new settings when it wakes (`running` keeps them).
fn reload(args: &[String], server: &Server, service: Option<&Service>, running: &mut Config, notifier: &Notifier) {
    let config = match Config::parse(args.to_vec(), |k| std::env::var(k).ok()) {
        Ok(Command::Serve(config)) => config,
        Ok(_) => return,
        Err(e) => {
            log::error!("reload refused, keeping the running configuration: {e}");
            notifier.status(&format!("reload failed: {e}"));
            return;
        }
    };
    let mut changed = match server.reload(&config.server) {
        Ok(changed) => changed,
        Err(e) => {
            log::error!("reload refused, keeping the running configuration: {e:#}");
            notifier.status(&format!("reload failed: {e:#}"));
            return;
        }
    };
    changed.splice(0..0, changes(running, &config));
    set_log_level(&config.log_level);
    running.log_level = config.log_level.clone();
    running.limits = config.limits.clone();
    running.engine.request_timeout = config.engine.request_timeout;
    // As the server does: the address and HTTP threads stay as started.
    let (listen, http_threads) = (running.server.listen.clone(), running.server.http_threads);
    running.server = config.server.clone();
    (running.server.listen, running.server.http_threads) = (listen, http_threads);
    if let Some(service) = service {
        service.frontend.set_limits(config.limits.clone());
        service.engine.set_request_timeout(config.engine.request_timeout);
    }
    let summary = if changed.is_empty() { "nothing changed".to_owned() } else { changed.join(", ") };
    log::info!("reloaded the configuration: {summary}");
    notifier.status(&format!("reloaded: {summary}"));
}

/// SIGTERM: refuse new work, give requests in flight `shutdown_timeout` to finish, then end
/// the rest (their streams get `finish_reason: "cancelled"` and `[DONE]`).
fn shutdown(server: &Server, service: Option<&Service>, notifier: &Notifier) {
    let grace = server.config().shutdown_timeout;
    let in_flight = server.in_flight();
    notifier.send(&format!("STOPPING=1\nSTATUS=draining: {in_flight} requests in flight"));
    log::info!("draining: {in_flight} requests in flight, up to {:.0} s", grace.as_secs_f64());
    server.drain();
    let deadline = Instant::now() + grace;
    while server.in_flight() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = server.in_flight();
    if left > 0 {
        log::warn!("cancelling {left} requests still running after {:.0} s", grace.as_secs_f64());
        if let Some(service) = service {
            service.engine.stop();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    log::info!("stopped");
}
