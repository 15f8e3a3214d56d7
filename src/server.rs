//! Start-up: builds the shared [`Gateway`] from the config (store, live catalog, clock), then a
//! Pingora server with three listeners — the proxy (generation traffic, billing endpoints,
//! Stripe webhook), the admin API on loopback, and `/metrics` — plus the background workers.
//! No `Opt::parse_args()`: the server is built from our own CLI and config.
//!
//! # Graceful stop
//!
//! On SIGTERM Pingora closes every listener at once (a new connection is refused), wakes the
//! keep-alive connections parked between requests so they close, and lets the requests that
//! are being served run on. Left alone it then sleeps the whole `grace_period_seconds` and
//! drops its runtimes, cutting whatever still runs. Here the proxy listener counts the
//! connections inside a request (`connection::InFlight`) and `connection::DrainWatch` ends the
//! process as soon as that count is zero — every admitted request answered and settled in its
//! `logging` phase — and at the latest when `server.shutdown_grace_s` ends; Pingora's own grace
//! is the same length and stays as the backstop. A connection whose request header had not
//! fully arrived at SIGTERM is closed without an answer (nothing was admitted or charged).

use std::sync::Arc;
use std::time::Duration;

use pingora::apps::http_app::HttpServer;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;

use crate::connection::{DrainWatch, HeadGuard, InFlight};

use crate::admin_api::AdminApp;
use crate::alerts::{AlertDelivery, AlertOutbox};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, StoreBackend};
use crate::gateway::Gateway;
use crate::ledger::{Ledger, MemoryLedger, RedisLedger};
use crate::live_catalog::LiveCatalog;
use crate::metrics::{self, MetricsApp};
use crate::proxy::CreditGateProxy;
use crate::reloader::Reloader;
use crate::stripe::StripeReporter;
use crate::sweeper::Sweeper;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the rules directory {dir} has errors:\n{problems}")]
    Rules { dir: String, problems: String },
    #[error("the store could not be set up: {0}")]
    Store(String),
    #[error("Stripe reporting could not be set up: {0}")]
    Stripe(String),
    #[error("low-balance alerts could not be set up: {0}")]
    Alerts(String),
}

/// The shared state, from a validated config.
pub fn build_gateway(config: Config, clock: SharedClock) -> Result<Arc<Gateway>, StartError> {
    let dir = config.rules_dir();
    let catalog = LiveCatalog::load(&dir).map_err(|problems| StartError::Rules {
        dir: dir.display().to_string(),
        problems: problems
            .iter()
            .map(|p| format!("  {p}"))
            .collect::<Vec<_>>()
            .join("\n"),
    })?;
    let mut redis = None;
    let ledger: Arc<dyn Ledger> = match config.store.backend {
        StoreBackend::Redis => {
            let r = Arc::new(
                RedisLedger::from_config(&config.store)
                    .map_err(|e| StartError::Store(e.to_string()))?
                    .with_usage_retention_days(config.billing.usage_retention_days),
            );
            redis = Some(r.clone());
            r
        }
        StoreBackend::Memory => {
            tracing::warn!(
                "store.backend = \"memory\": balances live in this process only and are lost on exit; use Redis in production"
            );
            Arc::new(
                MemoryLedger::new().with_usage_retention_days(config.billing.usage_retention_days),
            )
        }
    };
    metrics::set_catalog_version(catalog.snapshot().version);
    let alerts = alert_outbox(&config)?;
    let mut gw = Gateway::new(config, catalog, ledger, clock);
    gw.redis = redis;
    gw.alerts = alerts;
    Ok(Arc::new(gw))
}

/// Builds and runs the server until SIGTERM/SIGINT.
pub fn serve(config: Config) -> Result<(), StartError> {
    let gw = build_gateway(config, Arc::new(SystemClock))?;
    let admin_on_loopback = gw
        .config
        .server
        .admin_listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    if !admin_on_loopback {
        tracing::warn!(
            listen = %gw.config.server.admin_listen,
            "the admin API listens beyond loopback: restrict it (firewall, NetworkPolicy)"
        );
    }
    if gw.admin_token.is_none() {
        tracing::warn!(
            env = %gw.config.admin.token_env,
            "no admin token set: the admin API answers 401 to everything"
        );
    }
    let reporter = stripe_reporter(&gw)?;
    let alerts = alert_delivery(&gw)?;
    let mut server = build_server(gw);
    if let Some(r) = reporter {
        server.add_service(pingora::services::background::background_service(
            "stripe reporter",
            r,
        ));
    }
    if let Some(d) = alerts {
        server.add_service(pingora::services::background::background_service(
            "alert delivery",
            d,
        ));
    }
    server.run_forever();
}

/// The Pingora server with all services added, ready to run.
pub fn build_server(gw: Arc<Gateway>) -> Server {
    let cfg = &gw.config;
    let run_dir = std::env::temp_dir();
    let pid = std::process::id();
    let conf = ServerConf {
        threads: cfg.server.threads,
        // The backstop of `DrainWatch` (module doc): nothing runs past the grace.
        grace_period_seconds: Some(cfg.server.shutdown_grace_s),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: run_dir
            .join(format!("creditgate-{pid}.pid"))
            .display()
            .to_string(),
        upgrade_sock: run_dir
            .join(format!("creditgate-{pid}-upgrade.sock"))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut app = pingora::proxy::HttpProxy::new(
        CreditGateProxy::new(gw.clone()),
        server.configuration.clone(),
    );
    app.handle_init_modules();
    let in_flight = InFlight::default();
    let guarded = HeadGuard {
        app: Arc::new(app),
        header_timeout: Duration::from_millis(cfg.server.header_timeout_ms),
        in_flight: in_flight.clone(),
    };
    let mut proxy = Service::new("creditgate proxy".to_string(), guarded);
    proxy.add_tcp(&cfg.server.listen);

    let mut admin = Service::new(
        "admin".to_string(),
        HttpServer::new_app(AdminApp { gw: gw.clone() }),
    );
    admin.add_tcp(&cfg.server.admin_listen);

    let mut metrics = Service::new("metrics".to_string(), HttpServer::new_app(MetricsApp));
    metrics.add_tcp(&cfg.server.metrics_listen);

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(metrics);
    server.add_service(pingora::services::background::background_service(
        "catalog reloader",
        Reloader { gw: gw.clone() },
    ));
    server.add_service(pingora::services::background::background_service(
        "hold sweeper",
        Sweeper { gw: gw.clone() },
    ));
    server.add_service(pingora::services::background::background_service(
        "graceful stop",
        DrainWatch {
            in_flight,
            grace: Duration::from_secs(cfg.server.shutdown_grace_s),
            settle_margin: Duration::from_millis(cfg.store.command_timeout_ms),
        },
    ));
    server
}

/// The Stripe meter-event worker, when `stripe.enabled`. It needs Redis (the outbox is a Redis
/// stream) and the secret key from the environment; without them the gateway refuses to start
/// rather than pile up charges nobody reports.
fn stripe_reporter(gw: &Gateway) -> Result<Option<StripeReporter>, StartError> {
    let cfg = &gw.config;
    if !cfg.stripe.enabled {
        return Ok(None);
    }
    if cfg.store.backend != StoreBackend::Redis {
        return Err(StartError::Stripe(
            "stripe.enabled needs store.backend = \"redis\" (the outbox is a Redis stream)".into(),
        ));
    }
    let secret = std::env::var(&cfg.stripe.secret_key_env)
        .ok()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            StartError::Stripe(format!(
                "stripe.enabled but ${} is not set",
                cfg.stripe.secret_key_env
            ))
        })?;
    StripeReporter::for_store(
        crate::ledger::StoreNodes::from_config(&cfg.store),
        &cfg.stripe,
        &secret,
        gw.clock.clone(),
    )
    .map(Some)
    .map_err(|e| StartError::Stripe(e.to_string()))
}

/// The alert outbox writer, when `[alerts] enabled`; alerts need Redis (the outbox is a stream).
fn alert_outbox(cfg: &Config) -> Result<Option<Arc<AlertOutbox>>, StartError> {
    if !cfg.alerts.enabled {
        return Ok(None);
    }
    if cfg.store.backend != StoreBackend::Redis {
        return Err(StartError::Alerts(
            "alerts.enabled needs store.backend = \"redis\" (the outbox is a Redis stream)".into(),
        ));
    }
    AlertOutbox::for_store(
        crate::ledger::StoreNodes::from_config(&cfg.store),
        Duration::from_millis(cfg.store.command_timeout_ms.max(1000)),
    )
    .map(|o| Some(Arc::new(o)))
    .map_err(StartError::Alerts)
}

/// The alert delivery worker, when `[alerts] enabled`; refuses to start without the secret.
fn alert_delivery(gw: &Gateway) -> Result<Option<AlertDelivery>, StartError> {
    let cfg = &gw.config;
    if !cfg.alerts.enabled {
        return Ok(None);
    }
    let secret = std::env::var(&cfg.alerts.secret_env)
        .ok()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            StartError::Alerts(format!(
                "alerts.enabled but ${} is not set",
                cfg.alerts.secret_env
            ))
        })?;
    AlertDelivery::for_store(
        crate::ledger::StoreNodes::from_config(&cfg.store),
        &cfg.alerts,
        &secret,
        gw.clock.clone(),
    )
    .map(Some)
    .map_err(StartError::Alerts)
}
