//! The demo generation backend for the README's quick start: answers every request with a
//! succeeded job. `cargo run --example demo_backend -- 127.0.0.1:9000`

use creditgate::demo_backend::DemoBackend;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let backend = DemoBackend::start(&addr).await?;
    println!("demo backend listening on {}", backend.addr);
    std::future::pending::<()>().await;
    Ok(())
}
