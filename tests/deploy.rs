//! The deploy/ directory is code too: every file there must parse, and the facts that matter
//! (durable Redis, the rules ConfigMap equal to the real rules files, a config the gateway
//! accepts, HA replicas with the right probes, alerts on metrics that exist) are checked here.
//!
//! The two generated ConfigMaps (`configmap-rules.yaml`, `configmap-redis.yaml`) are rewritten
//! from their sources with `CREDITGATE_BLESS_DEPLOY=1 cargo test --test deploy`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use creditgate::config::Config;
use creditgate::rules::RULE_FILES;
use serde_yaml_ng::Value as Yaml;

const BLESS_ENV: &str = "CREDITGATE_BLESS_DEPLOY";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// Parsers, one per kind of file. Each returns the problems it found (empty = fine).

/// All documents of a (possibly multi-document) YAML stream; `---`-only documents are skipped.
fn yaml_documents(text: &str) -> Result<Vec<Yaml>, String> {
    let mut docs = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        let doc = serde::Deserialize::deserialize(de).map_err(|e| e.to_string())?;
        if !matches!(doc, Yaml::Null) {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Redis config: every non-comment line is `directive args...`; returns directive → args of the
/// last occurrence (later lines win in Redis).
fn parse_redis_conf(text: &str) -> Result<BTreeMap<String, String>, Vec<String>> {
    let mut problems = Vec::new();
    let mut directives = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (directive, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let args = args.trim();
        if directive.is_empty()
            || !directive
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            problems.push(format!("line {}: `{directive}` is not a directive", n + 1));
        }
        if args.is_empty() {
            problems.push(format!("line {}: `{directive}` has no arguments", n + 1));
        }
        if args.matches('"').count() % 2 != 0 {
            problems.push(format!("line {}: unbalanced quotes", n + 1));
        }
        directives.insert(directive.to_string(), args.to_string());
    }
    if problems.is_empty() {
        Ok(directives)
    } else {
        Err(problems)
    }
}

/// The money settings a Redis config must have.
fn redis_conf_fit_for_money(directives: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, want) in [("appendonly", "yes"), ("maxmemory-policy", "noeviction")] {
        match directives.get(key).map(String::as_str) {
            Some(v) if v == want => {}
            other => problems.push(format!("{key} must be `{want}`, is {other:?}")),
        }
    }
    if let Some(v) = directives.get("appendfsync") {
        if v == "no" {
            problems.push("appendfsync no leaves durability to the kernel".into());
        }
    }
    if directives
        .get("rename-command")
        .is_some_and(|v| v.to_ascii_uppercase().starts_with("CONFIG"))
    {
        problems.push("CONFIG must stay available: /readyz reads appendonly with it".into());
    }
    problems
}

/// (section, key) → values, in file order.
type Unit = BTreeMap<(String, String), Vec<String>>;

/// A systemd unit: `[Section]` headers and `Key=value` lines; returns (section, key) → values.
fn parse_unit(text: &str) -> Result<Unit, Vec<String>> {
    let mut problems = Vec::new();
    let mut out = Unit::new();
    let mut section: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_string());
            continue;
        }
        let Some(sec) = &section else {
            problems.push(format!("line {}: key outside any [Section]", n + 1));
            continue;
        };
        match line.split_once('=') {
            Some((k, v))
                if !k.trim().is_empty() && k.trim().bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                out.entry((sec.clone(), k.trim().to_string()))
                    .or_default()
                    .push(v.trim().to_string());
            }
            _ => problems.push(format!("line {}: not Key=value: `{line}`", n + 1)),
        }
    }
    for required in ["Unit", "Service", "Install"] {
        if !out.keys().any(|(s, _)| s == required) {
            problems.push(format!("missing [{required}] section"));
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// A Containerfile: the first instruction is FROM and every instruction is a known one.
fn check_containerfile(text: &str) -> Vec<String> {
    const KNOWN: &[&str] = &[
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
    ];
    let mut problems = Vec::new();
    let mut first = None;
    let mut continued = false;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let was_continued = continued;
        continued = line.ends_with('\\');
        if was_continued || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let instruction = line.split_whitespace().next().unwrap_or_default();
        if !KNOWN.contains(&instruction) {
            problems.push(format!(
                "line {}: unknown instruction `{instruction}`",
                n + 1
            ));
        }
        if first.is_none() && instruction != "ARG" {
            first = Some(instruction.to_string());
        }
    }
    if first.as_deref() != Some("FROM") {
        problems.push(format!("first instruction must be FROM, is {first:?}"));
    }
    problems
}

/// Every `creditgate_*` metric name an expression uses (string literals removed first, so
/// label values such as `reason="store_unavailable"` are not mistaken for names).
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    let mut without_strings = String::new();
    let mut in_string: Option<char> = None;
    for c in expr.chars() {
        match in_string {
            Some(q) if c == q => in_string = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => in_string = Some(c),
            None => without_strings.push(c),
        }
    }
    let mut names = BTreeSet::new();
    let bytes = without_strings.as_bytes();
    let mut i = 0;
    while let Some(pos) = without_strings[i..].find("creditgate_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let b = bytes[start - 1];
            !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.insert(without_strings[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    names
}

/// Metric names registered in src/metrics.rs.
fn known_metrics() -> BTreeSet<String> {
    let text = read(&root().join("src/metrics.rs"));
    let names: BTreeSet<String> = text
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("creditgate_")
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .map(str::to_string)
        .collect();
    assert!(
        names.contains("creditgate_requests_total"),
        "could not read metric names from src/metrics.rs: {names:?}"
    );
    names
}

/// Names in `expr` that are neither registered nor in the creditgate_stripe_* family.
/// Histogram series suffixes (_bucket, _sum, _count) are accepted on registered names.
fn unknown_metrics(expr: &str, known: &BTreeSet<String>) -> Vec<String> {
    metric_names_in(expr)
        .into_iter()
        .filter(|name| {
            if name.starts_with("creditgate_stripe_") || known.contains(name) {
                return false;
            }
            !["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| known.contains(base))
            })
        })
        .collect()
}

/// Brackets balanced (a cheap sanity check on PromQL; catches truncated edits).
fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut in_string = false;
    for c in expr.chars() {
        if c == '"' {
            in_string = !in_string;
            continue;
        }
        if in_string {
            continue;
        }
        let opener = match c {
            '(' | '{' | '[' => {
                stack.push(c);
                continue;
            }
            ')' => '(',
            '}' => '{',
            ']' => '[',
            _ => continue,
        };
        if stack.pop() != Some(opener) {
            return false;
        }
    }
    stack.is_empty() && !in_string
}

// ---------------------------------------------------------------------------------------------
// Generated ConfigMaps.

/// A ConfigMap whose data are the given files, each as a YAML literal block scalar that keeps
/// the bytes exactly (chomping indicator chosen from the trailing newlines).
fn configmap_yaml(header: &str, name: &str, component: &str, files: &[(&str, String)]) -> String {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("apiVersion: v1\nkind: ConfigMap\nmetadata:\n");
    out.push_str(&format!("  name: {name}\n  labels:\n"));
    out.push_str("    app.kubernetes.io/name: creditgate\n");
    out.push_str(&format!("    app.kubernetes.io/component: {component}\n"));
    out.push_str("data:\n");
    for (key, content) in files {
        let chomp = if !content.ends_with('\n') {
            "-"
        } else if content.ends_with("\n\n") {
            "+"
        } else {
            ""
        };
        // Explicit indentation indicator: safe even when the first line starts with a space.
        out.push_str(&format!("  {key}: |2{chomp}\n"));
        for line in content.lines() {
            if line.is_empty() {
                out.push('\n');
            } else {
                out.push_str("    ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn rules_files() -> Vec<(&'static str, String)> {
    RULE_FILES
        .iter()
        .map(|name| (*name, read(&root().join("lua-free-rules").join(name))))
        .collect()
}

fn generated_configmaps() -> Vec<(PathBuf, String)> {
    let k8s = deploy().join("kubernetes");
    vec![
        (
            k8s.join("configmap-rules.yaml"),
            configmap_yaml(
                "GENERATED from lua-free-rules/ by tests/deploy.rs: do not edit by hand.\n\
                 Regenerate: CREDITGATE_BLESS_DEPLOY=1 cargo test --test deploy\n\
                 Mounted as a directory at /etc/creditgate/lua-free-rules; a kubectl apply of a\n\
                 change reaches every pod within the kubelet sync period and the file watcher\n\
                 reloads the catalog (a bad catalog is refused; the old one keeps serving).",
                "creditgate-rules",
                "rules",
                &rules_files(),
            ),
        ),
        (
            k8s.join("configmap-redis.yaml"),
            configmap_yaml(
                "GENERATED from deploy/redis/redis.conf by tests/deploy.rs: do not edit by hand.\n\
                 Regenerate: CREDITGATE_BLESS_DEPLOY=1 cargo test --test deploy",
                "creditgate-redis-config",
                "redis",
                &[("redis.conf", read(&deploy().join("redis/redis.conf")))],
            ),
        ),
        (
            k8s.join("configmap-redis-cluster.yaml"),
            configmap_yaml(
                "GENERATED from deploy/redis/redis-cluster.conf by tests/deploy.rs: do not edit by hand.\n\
                 Regenerate: CREDITGATE_BLESS_DEPLOY=1 cargo test --test deploy\n\
                 The node config of redis-cluster.yaml (not in the default kustomization).",
                "creditgate-redis-cluster-config",
                "redis-cluster",
                &[("redis.conf", read(&deploy().join("redis/redis-cluster.conf")))],
            ),
        ),
    ]
}

fn bless() -> bool {
    std::env::var_os(BLESS_ENV).is_some_and(|v| v == "1")
}

fn configmap_data(path: &Path) -> BTreeMap<String, String> {
    let docs = yaml_documents(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", rel(path)));
    assert_eq!(docs.len(), 1, "{}: one ConfigMap expected", rel(path));
    assert_eq!(docs[0]["kind"].as_str(), Some("ConfigMap"), "{}", rel(path));
    let data = docs[0]["data"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{}: no data", rel(path)));
    data.iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_string(),
                v.as_str()
                    .unwrap_or_else(|| panic!("{}: data.{k:?} is not a string", rel(path)))
                    .to_string(),
            )
        })
        .collect()
}

/// Where the files embedded in a ConfigMap differ from their sources.
fn configmap_drift(data: &BTreeMap<String, String>, sources: &[(&str, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let want: BTreeSet<&str> = sources.iter().map(|(k, _)| *k).collect();
    let have: BTreeSet<&str> = data.keys().map(String::as_str).collect();
    if want != have {
        problems.push(format!("keys {have:?}, expected {want:?}"));
    }
    for (key, content) in sources {
        if let Some(embedded) = data.get(*key) {
            if embedded != content {
                let line = embedded
                    .lines()
                    .zip(content.lines())
                    .position(|(a, b)| a != b)
                    .map_or_else(|| "length".to_string(), |n| format!("line {}", n + 1));
                problems.push(format!("{key} differs from its source at {line}"));
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn generated_configmaps_are_current() {
    for (path, text) in generated_configmaps() {
        if bless() {
            std::fs::write(&path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "{} is stale: regenerate with {BLESS_ENV}=1 cargo test --test deploy",
            rel(&path)
        );
    }
}

#[test]
fn every_deploy_file_parses() {
    let files = files_under(&deploy());
    assert!(files.len() >= 12, "deploy/ looks empty: {files:?}");
    let mut problems = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_string())
            .unwrap_or_default();
        let text = read(path);
        let mut complain = |p: String| problems.push(format!("{}: {p}", rel(path)));
        match (name.as_str(), ext.as_str()) {
            (_, "md") => {}
            (_, "yaml" | "yml") => match yaml_documents(&text) {
                Ok(docs) if docs.is_empty() => complain("no YAML documents".into()),
                Ok(docs) => {
                    for doc in docs {
                        if !doc.is_mapping() {
                            complain("a document is not a mapping".into());
                        }
                    }
                }
                Err(e) => complain(format!("not YAML: {e}")),
            },
            (_, "json") => {
                if let Err(e) = serde_json::from_str::<serde_json::Value>(&text) {
                    complain(format!("not JSON: {e}"));
                }
            }
            (_, "toml") => match toml::from_str::<toml::Table>(&text) {
                Ok(_) => {
                    // Every creditgate.toml shipped in deploy/ must be one the gateway accepts.
                    if let Err(p) = Config::parse(&rel(path), &text) {
                        complain(format!("Config::parse refused it: {p:?}"));
                    }
                }
                Err(e) => complain(format!("not TOML: {e}")),
            },
            (_, "conf") => match parse_redis_conf(&text) {
                Ok(d) => redis_conf_fit_for_money(&d).into_iter().for_each(complain),
                Err(p) => p.into_iter().for_each(complain),
            },
            (_, "service") => {
                if let Err(p) = parse_unit(&text) {
                    p.into_iter().for_each(complain);
                }
            }
            ("Containerfile" | "Dockerfile", _) => {
                check_containerfile(&text).into_iter().for_each(complain)
            }
            _ => complain("no parser for this kind of file: add one to tests/deploy.rs".into()),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn rules_configmap_equals_the_rules_files() {
    let data = configmap_data(&deploy().join("kubernetes/configmap-rules.yaml"));
    let drift = configmap_drift(&data, &rules_files());
    assert!(
        drift.is_empty(),
        "configmap-rules.yaml drifted from lua-free-rules/ ({BLESS_ENV}=1 cargo test --test deploy): {drift:?}"
    );
    let data = configmap_data(&deploy().join("kubernetes/configmap-redis.yaml"));
    let drift = configmap_drift(
        &data,
        &[("redis.conf", read(&deploy().join("redis/redis.conf")))],
    );
    assert!(drift.is_empty(), "configmap-redis.yaml drifted: {drift:?}");
}

#[test]
fn redis_conf_is_fit_for_money() {
    let directives = parse_redis_conf(&read(&deploy().join("redis/redis.conf"))).unwrap();
    assert_eq!(redis_conf_fit_for_money(&directives), Vec::<String>::new());
    assert_eq!(directives["appendonly"], "yes");
    assert_eq!(directives["maxmemory-policy"], "noeviction");
    assert_eq!(directives["appendfsync"], "everysec");
    // The StatefulSet mounts its volume at /data.
    assert_eq!(directives["dir"], "/data");
}

/// The cluster node config is the single-node one (every directive, same value) plus the
/// cluster settings that keep money exact: full coverage or nothing, nodes.conf on the volume.
#[test]
fn redis_cluster_conf_is_redis_conf_plus_cluster() {
    let single = parse_redis_conf(&read(&deploy().join("redis/redis.conf"))).unwrap();
    let cluster = parse_redis_conf(&read(&deploy().join("redis/redis-cluster.conf"))).unwrap();
    assert_eq!(redis_conf_fit_for_money(&cluster), Vec::<String>::new());
    for (directive, value) in &single {
        assert_eq!(
            cluster.get(directive),
            Some(value),
            "redis-cluster.conf differs from redis.conf in {directive}"
        );
    }
    assert_eq!(cluster["cluster-enabled"], "yes");
    assert_eq!(cluster["cluster-config-file"], "/data/nodes.conf");
    assert_eq!(cluster["cluster-require-full-coverage"], "yes");
    assert_eq!(cluster["cluster-allow-reads-when-down"], "no");
}

/// redis-cluster.yaml: 6 nodes with the cluster config and a volume at /data, both ports on
/// the headless Service, a disruption budget of one, and the create Job for 3 + 3.
#[test]
fn redis_cluster_manifest_runs_three_masters_with_replicas() {
    let docs = yaml_documents(&read(&deploy().join("kubernetes/redis-cluster.yaml"))).unwrap();
    let of_kind = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("redis-cluster.yaml has no {kind}"))
    };
    let sts = of_kind("StatefulSet");
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(6));
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains(&"/data"), "{mounts:?}");
    let config = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("a ConfigMap volume");
    let generated = configmap_data(&deploy().join("kubernetes/configmap-redis-cluster.yaml"));
    assert!(generated.contains_key("redis.conf"));
    let cm = yaml_documents(&read(
        &deploy().join("kubernetes/configmap-redis-cluster.yaml"),
    ))
    .unwrap();
    assert_eq!(cm[0]["metadata"]["name"].as_str(), Some(config));
    let ports: Vec<u64> = of_kind("Service")["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(ports, vec![6379, 16379]);
    assert_eq!(
        of_kind("PodDisruptionBudget")["spec"]["maxUnavailable"].as_u64(),
        Some(1)
    );
    let job = of_kind("Job")["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(job.contains("--cluster create"), "{job}");
    assert!(job.contains("--cluster-replicas 1"), "{job}");
    // The config the manifest's header tells operators to use is one the gateway accepts.
    let text = read(&deploy().join("kubernetes/redis-cluster.yaml"));
    let store: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#   "))
        .filter(|l| {
            ["cluster", "url", "wait_replicas"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    assert_eq!(store.len(), 3, "{store:?}");
    // The shipped gateway config with its [store] url line replaced by these.
    let data = configmap_data(&deploy().join("kubernetes/configmap-config.yaml"));
    let base = data.get("creditgate.toml").expect("data.creditgate.toml");
    let url_line = base
        .lines()
        .find(|l| l.trim_start().starts_with("url = \"redis://redis:6379\""))
        .expect("configmap-config.yaml's [store] url line");
    let toml = base.replace(url_line, &store.join("\n"));
    let parsed = Config::parse("redis-cluster.yaml", &toml)
        .unwrap_or_else(|p| panic!("Config::parse refused {toml}: {p:?}"));
    assert!(parsed.store.cluster);
    assert_eq!(parsed.store.url.split(',').count(), 3);
}

fn deployment() -> (Yaml, u64) {
    let docs = yaml_documents(&read(&deploy().join("kubernetes/deployment.yaml"))).unwrap();
    let d = docs
        .into_iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .expect("deployment.yaml has a Deployment");
    let grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    (d, grace)
}

#[test]
fn kubernetes_config_is_accepted_by_the_gateway() {
    let data = configmap_data(&deploy().join("kubernetes/configmap-config.yaml"));
    let text = data.get("creditgate.toml").expect("data.creditgate.toml");
    let config = Config::parse("configmap-config.yaml", text)
        .unwrap_or_else(|p| panic!("Config::parse refused the ConfigMap's creditgate.toml: {p:?}"));
    assert_eq!(config.server.listen, "0.0.0.0:8080");
    assert_eq!(
        config.server.admin_listen, "0.0.0.0:8081",
        "probes reach /readyz here"
    );
    assert_eq!(config.server.metrics_listen, "0.0.0.0:9090");
    assert_eq!(config.store.url, "redis://redis:6379");

    let (d, grace) = deployment();
    let pod = &d["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    let mount_of = |configmap: &str| -> String {
        let volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["configMap"]["name"].as_str() == Some(configmap))
            .unwrap_or_else(|| panic!("no volume for ConfigMap {configmap}"));
        let mount = mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("ConfigMap {configmap} is not mounted"));
        assert!(
            mount.get("subPath").is_none(),
            "subPath mounts never see ConfigMap updates"
        );
        mount["mountPath"].as_str().unwrap().to_string()
    };
    assert_eq!(
        config.rules.dir,
        PathBuf::from(mount_of("creditgate-rules")),
        "rules.dir must be where creditgate-rules is mounted"
    );
    let config_path = format!("{}/creditgate.toml", mount_of("creditgate-config"));
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["serve", "--config", config_path.as_str()]);
    assert!(
        grace > config.server.shutdown_grace_s + 5,
        "terminationGracePeriodSeconds {grace} must exceed shutdown_grace_s {} + preStop",
        config.server.shutdown_grace_s
    );
}

#[test]
fn deployment_is_replicated_with_probes_and_scrape_annotations() {
    let (d, _) = deployment();
    let replicas = d["spec"]["replicas"].as_u64().expect("spec.replicas");
    assert!(
        replicas > 1,
        "replicas {replicas}: several instances share Redis"
    );
    let template = &d["spec"]["template"];
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(annotations["prometheus.io/port"].as_str(), Some("9090"));
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));

    let container = &template["spec"]["containers"][0];
    let ports: BTreeMap<String, u64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    for port in [8080, 8081, 9090] {
        assert!(
            ports.values().any(|p| *p == port),
            "port {port} not declared"
        );
    }
    let probe_target = |probe: &str| -> (String, u64) {
        let get = &container[probe]["httpGet"];
        let port = match &get["port"] {
            Yaml::Number(n) => n.as_u64().unwrap(),
            Yaml::String(name) => ports[name],
            other => panic!("{probe}: port {other:?}"),
        };
        (get["path"].as_str().expect("path").to_string(), port)
    };
    assert_eq!(probe_target("livenessProbe"), ("/healthz".into(), 8081));
    assert_eq!(probe_target("readinessProbe"), ("/readyz".into(), 8081));

    let secret_refs: BTreeSet<&str> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| e["valueFrom"]["secretKeyRef"]["name"].as_str())
        .collect();
    assert_eq!(secret_refs, BTreeSet::from(["creditgate-secrets"]));
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(container["resources"]["requests"]["cpu"].is_string());
}

#[test]
fn alerts_cover_the_money_paths_and_use_real_metrics() {
    let known = known_metrics();
    let docs = yaml_documents(&read(&deploy().join("prometheus/alerts.yaml"))).unwrap();
    let mut exprs = BTreeMap::new();
    for group in docs[0]["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"].as_str().expect("alert name").to_string();
            let expr = rule["expr"].as_str().expect("expr").to_string();
            assert!(balanced(&expr), "{alert}: unbalanced brackets in {expr}");
            let unknown = unknown_metrics(&expr, &known);
            assert!(unknown.is_empty(), "{alert}: unknown metrics {unknown:?}");
            assert!(rule["labels"]["severity"].is_string(), "{alert}: severity");
            assert!(exprs.insert(alert.clone(), expr).is_none(), "{alert} twice");
        }
    }
    let all = exprs.values().cloned().collect::<Vec<_>>().join("\n");
    for needle in [
        "creditgate_rejections_total{reason=\"store_unavailable\"}",
        "creditgate_stripe_outbox_backlog",
        "creditgate_catalog_reloads_total{result=\"error\"}",
        "creditgate_settlement_failures_total",
        "upstream_failed|upstream_timeout|store_unavailable|internal_error",
    ] {
        assert!(all.contains(needle), "no alert uses {needle}");
    }
}

#[test]
fn dashboard_queries_use_real_metrics() {
    let known = known_metrics();
    let dash: serde_json::Value =
        serde_json::from_str(&read(&deploy().join("grafana/creditgate.json"))).unwrap();
    let panels = dash["panels"].as_array().expect("panels");
    let mut used = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "{title}: duplicate id"
        );
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            assert!(balanced(expr), "{title}: unbalanced {expr}");
            let unknown = unknown_metrics(expr, &known);
            assert!(unknown.is_empty(), "{title}: unknown metrics {unknown:?}");
            used.extend(metric_names_in(expr));
        }
    }
    for needle in [
        "creditgate_credits_charged_total",
        "creditgate_credits_refunded_total",
        "creditgate_ppu_spend_usd_total",
        "creditgate_rejections_total",
        "creditgate_requests_total",
        "creditgate_store_latency_seconds_bucket",
        "creditgate_catalog_version",
    ] {
        assert!(used.contains(needle), "dashboard shows no {needle}");
    }
}

#[test]
fn systemd_unit_runs_reloads_and_stops_cleanly() {
    let unit = parse_unit(&read(&deploy().join("systemd/creditgate.service")))
        .unwrap_or_else(|p| panic!("{p:?}"));
    let get = |key: &str| -> &str {
        unit.get(&("Service".to_string(), key.to_string()))
            .and_then(|v| v.last())
            .map(String::as_str)
            .unwrap_or_else(|| panic!("[Service] {key} missing"))
    };
    assert_eq!(
        get("ExecStart"),
        "/usr/local/bin/creditgate serve --config /etc/creditgate/creditgate.toml"
    );
    assert_eq!(get("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(get("Restart"), "on-failure");
    assert_eq!(get("KillSignal"), "SIGTERM");
    assert!(get("EnvironmentFile").starts_with('/'));
    assert_eq!(get("NoNewPrivileges"), "yes");
    let stop: u64 = get("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    let default_grace = creditgate::config::ServerConfig::default().shutdown_grace_s;
    assert!(
        stop > default_grace,
        "TimeoutStopSec {stop} <= shutdown grace {default_grace}"
    );
}

#[test]
fn containerfile_is_multi_stage_and_unprivileged() {
    let text = read(&deploy().join("container/Containerfile"));
    assert_eq!(check_containerfile(&text), Vec::<String>::new());
    let froms: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2, "builder + runtime stages: {froms:?}");
    assert!(froms[0].contains("rust:1-bookworm"));
    assert!(froms[1].contains("debian:bookworm-slim"));
    assert!(text.contains("cmake"));
    assert!(text
        .lines()
        .any(|l| l.starts_with("USER ") && !l.contains("root")));
    assert!(text.lines().any(|l| l.trim() == "EXPOSE 8080 8081 9090"));
}

// The checkers above must be able to say no.
#[test]
fn checkers_reject_broken_inputs() {
    let known = known_metrics();
    assert_eq!(
        unknown_metrics(
            "rate(creditgate_made_up_total{reason=\"creditgate_x\"}[5m]) + creditgate_stripe_anything",
            &known
        ),
        vec!["creditgate_made_up_total".to_string()]
    );
    assert!(
        unknown_metrics("rate(creditgate_store_latency_seconds_bucket[5m])", &known).is_empty()
    );
    assert!(!balanced("sum(rate(creditgate_requests_total[5m])"));

    let evicting = parse_redis_conf("appendonly yes\nmaxmemory-policy allkeys-lru\n").unwrap();
    assert_eq!(redis_conf_fit_for_money(&evicting).len(), 1);
    let later_wins =
        parse_redis_conf("appendonly yes\nappendonly no\nmaxmemory-policy noeviction\n").unwrap();
    assert_eq!(redis_conf_fit_for_money(&later_wins).len(), 1);
    assert!(parse_redis_conf("appendonly\n").is_err());

    assert!(parse_unit("ExecStart=/bin/true\n").is_err());
    assert!(check_containerfile("RUN true\nFROM debian\n").len() == 1);
    assert!(yaml_documents("a: [1, 2\n").is_err());

    let mut rules = rules_files();
    let data: BTreeMap<String, String> = rules
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    rules[0].1.push(' ');
    assert_eq!(configmap_drift(&data, &rules).len(), 1);
}

// The generator keeps bytes exactly, whatever the trailing newlines and leading spaces.
#[test]
fn configmap_generator_round_trips() {
    let cases = [
        "a = 1\n",
        "a = 1",
        "a = 1\n\n\n",
        "  indented first line\n\nnext\ttab  \n",
        "# comment: with colon\nkey = \"- not a list\"\n",
    ];
    for content in cases {
        let yaml = configmap_yaml("t", "t", "t", &[("f", content.to_string())]);
        let docs = yaml_documents(&yaml).unwrap();
        assert_eq!(docs[0]["data"]["f"].as_str(), Some(content), "{yaml}");
    }
}
