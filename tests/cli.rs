//! The `creditgate` commands as an operator runs them: `catalog` prints the seed's tables,
//! `check` passes on the shipped files and fails on broken ones, naming file and field.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_creditgate"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c.env_remove("CREDITGATE_CONFIG");
    c
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn config_with_rules(dir: &Path, rules: &Path) -> PathBuf {
    let path = dir.join("creditgate.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\naddress = \"127.0.0.1:9000\"\n[rules]\ndir = \"{}\"\n",
            rules.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn catalog_prints_the_seed_tables() {
    let out = bin().arg("catalog").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let squash = |s: &str| {
        s.split(|c: char| c == '|' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let rows: Vec<String> = text.lines().map(squash).collect();
    let has = |row: &str| rows.iter().any(|r| r == row);
    for row in [
        "Free 10 on signup 0 Free",
        "Starter 100 4 $16/mo",
        "Pro 300 10 $39/mo",
        "Business 700 20 $79/mo",
        "Ideogram V3 Turbo $0.054",
        "SeeDream 4.5 $0.061",
        "Nano Banana 2 $0.072",
        "Nano Banana Pro (Replicate) $0.072",
        "SeeDream 5 Lite $0.072",
        "SeeDream 4.0 $0.072",
        "Qwen Image Edit Plus $0.072",
        "Qwen Image Edit 2511 $0.072",
        "Z-Image Turbo $0.072",
        "GPT Image 2 $0.095",
        "Flux 2 Pro $0.108",
        "Ideogram V3 $0.108",
        "Nano Banana Pro $0.121",
        "Ideogram V3 Quality $0.162",
        "Midjourney V7 $0.324",
        "Operation Gemini Pro Nano Banana 2 SeeDream 4.5 SeeDream 5",
        "Product Enhancement 3 cr 2 cr 1 cr 2 cr",
        "Fashion Editorial 3 cr 2 cr 1 cr 2 cr",
        "Relight 3 cr 2 cr 1 cr 2 cr",
    ] {
        assert!(has(row), "missing row {row:?} in:\n{text}");
    }
    assert!(
        rows.iter().any(|r| r.starts_with("Video (5s) 10 cr")),
        "{text}"
    );
    assert!(
        rows.iter().any(|r| r.starts_with("Video (10s) 20 cr")),
        "{text}"
    );

    let out = bin()
        .args(["catalog", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.to_string().contains("0.324"), "{v}");
}

#[test]
fn check_passes_on_the_shipped_files() {
    let out = bin().arg("check").output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_names_file_and_field_of_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules"),
        &rules,
    );
    let models = std::fs::read_to_string(rules.join("models.toml")).unwrap();
    assert!(models.contains("0.324"));
    std::fs::write(
        rules.join("models.toml"),
        models.replacen("0.324", "-0.324", 1),
    )
    .unwrap();
    let plans = std::fs::read_to_string(rules.join("plans.toml")).unwrap();
    std::fs::write(
        rules.join("plans.toml"),
        plans.replacen("\"starter\"", "\"free\"", 1),
    )
    .unwrap();
    let config = config_with_rules(tmp.path(), &rules);
    let out = bin()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("models.toml"), "{err}");
    assert!(err.contains("rate_usd"), "{err}");
    assert!(
        err.contains("plans.toml"),
        "both problems are listed: {err}"
    );

    // Config problems are listed too, with their keys.
    std::fs::write(
        &config,
        "[server]\nlisten = \"nowhere\"\n[store]\nfail_mode = \"open\"\n",
    )
    .unwrap();
    let out = bin()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["server.listen", "store.fail_mode", "upstream.address"] {
        assert!(err.contains(field), "{field} missing: {err}");
    }
}

#[test]
fn config_env_overrides_the_default_path() {
    let out = bin()
        .arg("check")
        .env("CREDITGATE_CONFIG", "/nonexistent/creditgate.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/creditgate.toml"));
}
