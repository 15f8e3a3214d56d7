//! The load benchmark's baseline: a bare Pingora passthrough on the same Pingora version and
//! thread count as the gateway. `upstream_peer` returns the configured upstream and nothing else
//! happens — no auth, no rules, no store, no metrics, no logging — so `scripts/load.sh` can say
//! what creditgate costs on top of Pingora itself.
//!
//! ```text
//! cargo run --release --example bare_proxy -- <listen addr> <upstream addr> [threads]
//! cargo run --release --example bare_proxy -- 127.0.0.1:8180 127.0.0.1:9000 2
//! ```
//!
//! Built from its arguments (no `Opt::parse_args()`); the upstream peer carries the same connect
//! and read timeouts as the gateway's defaults so the two differ only in what the gateway adds.

use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::Result;

struct BareProxy {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for BareProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream.as_str(), false, String::new());
        peer.options.connection_timeout = Some(Duration::from_millis(2_000));
        peer.options.read_timeout = Some(Duration::from_millis(120_000));
        Ok(Box::new(peer))
    }
}

fn usage() -> ! {
    eprintln!("usage: bare_proxy <listen addr> <upstream addr> [threads (default 2)]");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        usage()
    };
    let threads = match args.next() {
        None => 2,
        Some(t) => t.parse::<usize>().unwrap_or_else(|_| usage()),
    };

    let run_dir = std::env::temp_dir();
    let pid = std::process::id();
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: run_dir
            .join(format!("bare-proxy-{pid}.pid"))
            .display()
            .to_string(),
        upgrade_sock: run_dir
            .join(format!("bare-proxy-{pid}-upgrade.sock"))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, BareProxy { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    eprintln!("bare proxy listening on {listen} with {threads} threads");
    server.run_forever();
}
