//! `trainrelay status --format prometheus|openmetrics` against the real daemon, read back by
//! a real parser (Python's `prometheus_client`, the reference client library), and the
//! `--output` file a node_exporter textfile collector reads, also when the daemon is gone.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use trainrelay_testkit::ops::*;
use trainrelay_testkit::*;

/// Parses metrics text with prometheus_client's parser for `format`; returns every sample as
/// `name{label="value",...}` (labels sorted) -> value.
fn parse(text: &str, format: &str) -> Option<HashMap<String, f64>> {
    let parser = match format {
        "openmetrics" => "prometheus_client.openmetrics.parser",
        _ => "prometheus_client.parser",
    };
    let script = format!(
        "import sys, json, importlib\n\
         p = importlib.import_module('{parser}')\n\
         out = {{}}\n\
         for fam in p.text_string_to_metric_families(sys.stdin.read()):\n\
         \x20   for s in fam.samples:\n\
         \x20       labels = ','.join('%s=\"%s\"' % kv for kv in sorted(s.labels.items()))\n\
         \x20       out['%s{{%s}}' % (s.name, labels)] = s.value\n\
         print(json.dumps(out))\n"
    );
    let available = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    if !require_or_skip(
        "metrics parser",
        available,
        "python3 with prometheus_client is not installed (pip install prometheus-client)",
    ) {
        return None;
    }
    let mut child = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser refused the output: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("parser output"))
}

fn metrics(socket: &std::path::Path, format: &str) -> (String, std::process::ExitStatus) {
    let out = status_cli(
        &[
            "--socket",
            &socket.display().to_string(),
            "--format",
            format,
        ],
        None,
    );
    (String::from_utf8(out.stdout).unwrap(), out.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_match_the_status_report() {
    let tmp = tempfile::tempdir().unwrap();
    let mut central = Central::start(tmp.path()).await;
    central.stop(); // down: messages wait in the store
    let config = relay_config(&central.url(), &store_section(""));
    let mut relay = Daemon::start(tmp.path(), &config, &[]).await;
    let socket = relay.socket();
    let mut ipad = V5Client::connect(relay.local_port, "ipad-cab-1", true).await;
    ipad.publish_acked("up/report", payloads("r", 6), None)
        .await;

    let report = query(&socket, "status");
    let depth = report["status"]["store"]["depth"].as_u64().unwrap() as f64;
    for format in ["prometheus", "openmetrics"] {
        let (text, status) = metrics(&socket, format);
        assert!(status.success(), "{format}: {status:?}");
        let Some(m) = parse(&text, format) else {
            return;
        };
        let get = |k: &str| {
            *m.get(k)
                .unwrap_or_else(|| panic!("{format}: no sample {k} in\n{text}"))
        };
        assert_eq!(get("trainrelay_up{train_id=\"T1\"}"), 1.0);
        assert_eq!(get("trainrelay_uplink_connected{train_id=\"T1\"}"), 0.0);
        assert_eq!(get("trainrelay_queue_messages{train_id=\"T1\"}"), depth);
        assert_eq!(
            get("trainrelay_queue_route_messages{route=\"up:up/#\",train_id=\"T1\"}"),
            6.0
        );
        assert!(get("trainrelay_messages_accepted_total{train_id=\"T1\"}") >= 6.0);
        assert_eq!(
            get("trainrelay_messages_forwarded_total{train_id=\"T1\"}"),
            0.0
        );
        assert_eq!(get("trainrelay_local_clients{train_id=\"T1\"}"), 1.0);
        let connections = m
            .keys()
            .filter(|k| k.starts_with("trainrelay_uplink_connection_up{"))
            .count();
        assert_eq!(connections, 4, "one sample per uplink connection:\n{text}");
        if format == "openmetrics" {
            assert!(text.ends_with("# EOF\n"));
        }
    }

    // The textfile collector's file: replaced whole, and it says so when the daemon is gone.
    let file = tmp.path().join("trainrelay.prom");
    let config_path = relay.config_path.clone();
    let run = |file: &std::path::Path| {
        status_cli(
            &[
                "--config",
                &config_path.display().to_string(),
                "--socket",
                &socket.display().to_string(),
                "--format",
                "prometheus",
                "--output",
                &file.display().to_string(),
            ],
            None,
        )
    };
    assert!(run(&file).status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("trainrelay_up{train_id=\"T1\"} 1\n"),
        "{text}"
    );
    relay.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = run(&file);
    assert_eq!(out.status.code(), Some(3), "the daemon is not running");
    let text = std::fs::read_to_string(&file).unwrap();
    let m = parse(&text, "prometheus").expect("parsed above");
    assert_eq!(
        m.get("trainrelay_up{train_id=\"T1\"}"),
        Some(&0.0),
        "{text}"
    );
    assert!(
        !text.contains("trainrelay_queue_messages"),
        "stale figures left in the file:\n{text}"
    );
}
