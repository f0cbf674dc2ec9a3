//! kefu's edge router (`kefu-router`, DESIGN §8): a health-checked table of nodes, `GET
//! /v1/connect` naming the best node for a client, and HTTP, WebSocket and J-IM binary TCP
//! proxied to it. `route` holds the choices as pure functions; `config` the settings; `serve` the
//! node table, its poller and J-IM TCP; `proxy` HTTP and WebSocket with `fly-replay`.

pub mod config;
pub mod proxy;
pub mod route;
pub mod serve;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

/// Runs the router until Ctrl-C or SIGTERM: reads its configuration, polls the nodes, serves.
/// Shared by `kefu-router` and the test harness's router binary.
pub fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KEFU_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let config = Arc::new(config::RouterConfig::resolve(config::Flags::parse())?);
    let http = tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let tcp = tokio::net::TcpListener::bind(config.tcp_listen).await.with_context(|| format!("binding {}", config.tcp_listen))?;
    let table = serve::table(&config);
    tokio::spawn(serve::poll(Arc::clone(&table), Arc::clone(&config)));
    // Scripts and tests read this line to find the ports.
    println!(
        "kefu-router listening http={} tcp={} region={} nodes={}",
        http.local_addr()?,
        tcp.local_addr()?,
        config.region,
        config.nodes.len()
    );
    tokio::spawn(proxy::serve_http(http, Arc::clone(&table), Arc::clone(&config)));
    tokio::spawn(serve::serve_tcp(tcp, Arc::clone(&table), Arc::clone(&config)));
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await?;
    Ok(())
}
