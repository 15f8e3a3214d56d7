//! The demo generation backend for the README's quick start: answers every request with a
//! succeeded job (a video starts one, named in the body's `id`; polls of
//! `GET /api/v1/jobs/{id}` report it `succeeded`, so the first poll settles it). `cargo run --example demo_backend -- 127.0.0.1:9000 [delay ms]`
//! (the optional delay holds every response that long: the load benchmark's slow upstream).

use std::time::Duration;

use creditgate::demo_backend::{Behaviour, DemoBackend};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let delay_ms: u64 = args.next().and_then(|d| d.parse().ok()).unwrap_or(0);
    let backend = DemoBackend::start(&addr).await?;
    backend.set_behaviour(Behaviour {
        delay: Duration::from_millis(delay_ms),
        ..Behaviour::default()
    });
    println!(
        "demo backend listening on {} (delay {delay_ms} ms)",
        backend.addr
    );
    std::future::pending::<()>().await;
    Ok(())
}
