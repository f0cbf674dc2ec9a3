//! The `kefu-node` command line: parses the configuration, starts the node, prints where it
//! listens, and stops cleanly on Ctrl-C or SIGTERM. Shared by the `kefu-node` binary and the test
//! harness's node binary, so tests run exactly what users run.

use std::time::Instant;

use crate::config::{Config, Flags, Profile};
use clap::Parser;

/// Runs the node until Ctrl-C or SIGTERM.
pub fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KEFU_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let mut flags = Flags::parse();
    if let Some(tool) = flags.tool.take() {
        return runtime(None)?.block_on(crate::tools::run(tool, flags));
    }
    // The configuration is resolved before the runtime starts: it sets the runtime's size.
    let config = Config::resolve(flags)?;
    runtime(Some(config.worker_threads))?.block_on(run(config, started))
}

/// The multi-thread runtime with every driver; `workers: None` is tokio's default (one per core).
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    builder.enable_all().build()
}

async fn run(config: Config, started: Instant) -> anyhow::Result<()> {
    let profile = config.profile;
    let data_dir = config.data_dir.clone();
    let api_key = config.api_key.is_some();
    let node = crate::start(config).await?;
    // Installed before the ready line: a SIGHUP that arrives right after it must not find the
    // default action (which ends the process).
    #[cfg(unix)]
    {
        // SIGHUP re-reads the certificate files (or renews a self-signed certificate that is due).
        let certs = std::sync::Arc::clone(&node.core().certs);
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    match certs.reload(std::time::SystemTime::now()) {
                        Ok(changed) => tracing::info!(changed, fingerprint = %certs.fingerprint(), "reloaded the TLS certificate"),
                        Err(e) => tracing::error!(error = %e, "reloading the TLS certificate failed; keeping the old one"),
                    }
                }
            });
        }
    }
    // Tests and scripts read these lines from stdout to find the ports.
    println!("kefu-node listening jim={} (J-IM tcp, http, ws)", node.jim_addr);
    println!("kefu-node listening tls={} (J-IM tcp, https, wss; ALPN kefu-tcp/1, h2, http/1.1)", node.tls_addr);
    println!("kefu-node listening quic={} (udp; ALPN kefu/1, h3 + WebTransport at /wt)", node.quic_addr);
    println!("kefu-node listening admin={} (healthz, readyz, metrics)", node.admin_addr);
    if let (Some(addr), Some(mesh)) = (node.mesh_addr, &node.core().mesh) {
        println!("kefu-node listening mesh={addr} (udp; ALPN kefu-mesh/1) node={} region={}", mesh.me.id, mesh.me.region);
    }
    println!("kefu-node tls fingerprint sha256={}", node.core().certs.fingerprint());
    println!("kefu-node ready data_dir={} profile={:?} startup_ms={}", data_dir.display(), profile, started.elapsed().as_millis());
    if profile == Profile::Dev {
        eprintln!(
            "note: dev profile: unknown users are registered on first login{}",
            if api_key { "" } else { "; the HTTP APIs need no API key" }
        );
    }
    shutdown_signal().await;
    eprintln!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return drop(ctrl_c.await),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
