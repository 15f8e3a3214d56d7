//! A property-based fuzz of the OpenAPI document against the real binary: schemathesis (PyPI,
//! pinned, installed into a venv by `scripts/setup.sh`) generates requests from the document
//! the admin listener serves and sends them to both listeners of a gateway in front of a real
//! redis-server and the demo backend, with an account and a key. It fails on any 5xx and on
//! any answer whose status, content type, headers or body the document does not describe. It
//! never skips: without schemathesis it fails and says how to install it.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use creditgate::demo_backend::DemoBackend;
use serde_json::json;
use support::gateway::{GatewayProcess, ADMIN_TOKEN};
use support::RedisServer;

/// The version `scripts/setup.sh` installs.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// Test cases per operation and phase: bounded so one run takes well under two minutes here.
const MAX_EXAMPLES: &str = "100";
/// Fixed, so a failure reproduces; change it to explore elsewhere.
const SEED: &str = "20261202";
/// No 5xx; status, content type, headers and body as documented; schema-violating input
/// refused; no operation answers without its credentials. Left out: `positive_data_acceptance`
/// (schema-valid requests are refused when sources disagree, e.g. body `model` ≠ `X-Model`,
/// which a schema cannot say) and `unsupported_method` (the contract answers 404, not 405).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,\
                      negative_data_rejection,ignored_auth,missing_required_header";

/// `$CREDITGATE_SCHEMATHESIS`, else where `scripts/setup.sh` puts it.
fn schemathesis() -> PathBuf {
    if let Some(p) = std::env::var_os("CREDITGATE_SCHEMATHESIS") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("CREDITGATE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/creditgate")))
        .expect("HOME or CREDITGATE_CACHE is set");
    cache.join("schemathesis-venv/bin/schemathesis")
}

fn check_installed(bin: &PathBuf) {
    let out = Command::new(bin).arg("--version").output();
    let version = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => panic!(
            "schemathesis is not installed at {} (run `bash scripts/setup.sh`, which installs \
             schemathesis=={SCHEMATHESIS_VERSION} from PyPI into that venv)",
            bin.display()
        ),
    };
    assert!(
        version.contains(SCHEMATHESIS_VERSION),
        "{} is {version:?}, expected {SCHEMATHESIS_VERSION} (run `bash scripts/setup.sh`)",
        bin.display()
    );
}

/// One schemathesis run over the operations with these tags; returns its exit status.
/// It runs in `workdir`, where it keeps its state (`.schemathesis/`), not in the repository.
fn run(
    bin: &PathBuf,
    workdir: &Path,
    schema_url: &str,
    base_url: &str,
    tags: &str,
    auth: &str,
) -> bool {
    let started = Instant::now();
    println!("---- schemathesis: {tags} against {base_url}");
    let status = Command::new(bin)
        .arg("--no-color")
        .arg("run")
        .arg(schema_url)
        .args(["--url", base_url])
        .args(["--include-tag-regex", tags])
        .args(["--header", &format!("Authorization: Bearer {auth}")])
        .args(["--checks", CHECKS])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", SEED])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--workers", "1"])
        .args(["--request-timeout", "10"])
        .args(["--generation-database", "none"])
        .args(["--suppress-health-check", "all"])
        .current_dir(workdir)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    println!(
        "---- schemathesis: {tags} done in {:.1} s ({status})",
        started.elapsed().as_secs_f64()
    );
    status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let bin = schemathesis();
    check_installed(&bin);
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account_with(json!({"id": "fuzz", "plan": "business", "payPerUse": true}))
        .await;
    let key = gw.create_key("fuzz").await;
    let granted = gw
        .admin(
            "POST",
            "/admin/accounts/fuzz/credits",
            Some(json!({"amount": 1_000_000, "reason": "fuzz"})),
        )
        .await;
    assert_eq!(granted.status, 200, "{}", granted.text());

    let schema_url = format!("http://{}/openapi.json", gw.admin);
    let admin = format!("http://{}", gw.admin);
    let proxy = format!("http://{}", gw.proxy);
    let workdir = gw.dir.path().to_path_buf();
    // Blocking child processes: run them off the runtime's workers.
    let admin_ok = {
        let (bin, schema_url, workdir) = (bin.clone(), schema_url.clone(), workdir.clone());
        tokio::task::spawn_blocking(move || {
            run(
                &bin,
                &workdir,
                &schema_url,
                &admin,
                "^(admin|probes)$",
                ADMIN_TOKEN,
            )
        })
        .await
        .expect("admin run")
    };
    let proxy_ok = tokio::task::spawn_blocking(move || {
        run(
            &bin,
            &workdir,
            &schema_url,
            &proxy,
            "^(billing|generation)$",
            &key,
        )
    })
    .await
    .expect("proxy run");
    let log = gw.log();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "the gateway panicked: {panics:?}");
    assert!(
        admin_ok && proxy_ok,
        "schemathesis reported failures (admin listener ok: {admin_ok}, proxy listener ok: \
         {proxy_ok}); see its output above"
    );
}
