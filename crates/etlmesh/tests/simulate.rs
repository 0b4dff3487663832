//! `etlmesh simulate` against the machine's Mosquitto: every message arrives, on the
//! device's topic, and the malformed and late ones are exactly those it says it sent.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const BROKER: &str = "127.0.0.1:1883";

/// `N` in "… (N <what>" or ", N <what>" of the simulator's summary.
fn figure(summary: &str, what: &str) -> u64 {
    let at = summary
        .find(what)
        .unwrap_or_else(|| panic!("{what} in {summary}"));
    summary[..at]
        .trim_end()
        .rsplit([' ', '('])
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number before {what} in {summary}"))
}

/// A unique topic prefix for one test.
fn prefix() -> String {
    format!(
        "etlmesh-test-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Subscribes to `prefix/+/reading`, runs `etlmesh simulate ARGS` publishing there,
/// and returns its summary line and the `count` messages received.
async fn simulate(prefix: &str, args: &[&str], count: u64) -> (String, Vec<(String, Bytes)>) {
    let mut opts = MqttOptions::new(format!("{prefix}-sub"), "127.0.0.1", 1883);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(opts, 1024);
    client
        .subscribe(format!("{prefix}/+/reading"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.expect("connected") {
            break;
        }
    }
    let topic = format!("{prefix}/{{device_id}}/reading");
    let count_arg = count.to_string();
    let broker = format!("mqtt://{BROKER}");
    let mut all = vec![
        "simulate", "--broker", &broker, "--topic", &topic, "--count", &count_arg, "--qos", "1",
    ];
    all.extend_from_slice(args);
    let sim = tokio::process::Command::new(env!("CARGO_BIN_EXE_etlmesh"))
        .args(&all)
        .env("ETLMESH_LOG_FORMAT", "text")
        .output();
    let receive = async {
        let mut got = Vec::new();
        while (got.len() as u64) < count {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => got.push((p.topic, p.payload)),
                Ok(_) => {}
                Err(e) => panic!("subscriber: {e}"),
            }
        }
        got
    };
    let (out, got) = tokio::join!(sim, tokio::time::timeout(Duration::from_secs(60), receive));
    let out = out.expect("simulate runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let got = got.expect("every message within 60 s");
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("published "))
        .expect("summary")
        .to_string();
    assert_eq!(figure(&summary, "messages"), count, "{summary}");
    assert_eq!(figure(&summary, "acknowledged"), count, "{summary}");
    (summary, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_publish_every_message_with_the_faults_they_report() {
    if !common::service("Mosquitto", BROKER) {
        return;
    }
    let prefix = prefix();
    let started_ms = now_ms();
    let (summary, got) = simulate(
        &prefix,
        &[
            "--devices",
            "20",
            "--rate",
            "2500",
            "--malformed",
            "0.02",
            "--late",
            "0.01",
            "--late-by",
            "10m",
            "--out-of-order",
            "0.05",
            "--seed",
            "3",
        ],
        5000,
    )
    .await;
    let (mut malformed, mut late, mut devices) = (0u64, 0u64, HashSet::new());
    for (topic, payload) in &got {
        let v: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
        let good = v.as_ref().is_some_and(|v| {
            v["device_id"].is_string() && v["ts"].is_i64() && v["temperature_c"].is_number()
        });
        if !good {
            malformed += 1;
            continue;
        }
        let v = v.expect("good");
        let id = v["device_id"].as_str().expect("id");
        assert_eq!(topic, &format!("{prefix}/{id}/reading"));
        devices.insert(id.to_string());
        if v["ts"].as_i64().expect("ts") < started_ms - 5 * 60 * 1000 {
            late += 1;
        }
    }
    assert_eq!(malformed, figure(&summary, "malformed"), "{summary}");
    assert!(malformed > 0, "some malformed payloads: {summary}");
    // A late reading may also have been made malformed.
    let sent_late = figure(&summary, "late");
    assert!(
        late <= sent_late && late + malformed >= sent_late && late > 0,
        "{late} late received: {summary}"
    );
    assert_eq!(devices.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_can_be_json_arrays_or_csv_lines() {
    if !common::service("Mosquitto", BROKER) {
        return;
    }
    let prefix_a = prefix();
    let (summary, got) = simulate(
        &prefix_a,
        &[
            "--payload",
            "json-array",
            "--readings-per-message",
            "5",
            "--malformed",
            "0",
            "--rate",
            "2000",
        ],
        300,
    )
    .await;
    assert_eq!(figure(&summary, "readings"), 1500, "{summary}");
    for (topic, payload) in &got {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("a JSON array");
        let a = v.as_array().expect("array");
        assert_eq!(a.len(), 5);
        // One device per message, named by the topic.
        let id = a[0]["device_id"].as_str().expect("id");
        assert!(a.iter().all(|r| r["device_id"] == id));
        assert_eq!(topic, &format!("{prefix_a}/{id}/reading"));
    }

    let prefix_c = prefix();
    let (summary, got) = simulate(
        &prefix_c,
        &[
            "--payload",
            "csv",
            "--malformed",
            "0.05",
            "--rate",
            "2000",
            "--seed",
            "9",
        ],
        1000,
    )
    .await;
    let malformed = got
        .iter()
        .filter(|(_, p)| {
            let Ok(line) = std::str::from_utf8(p) else {
                return true;
            };
            let f: Vec<&str> = line.split(',').collect();
            f.len() != 7 || f[1].parse::<i64>().is_err() || f[2].parse::<f64>().is_err()
        })
        .count() as u64;
    assert_eq!(malformed, figure(&summary, "malformed"), "{summary}");
    assert!(malformed > 0);
}

#[test]
fn a_broker_that_does_not_answer_is_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_etlmesh"))
        .args(["simulate", "--broker", "mqtt://127.0.0.1:9", "--count", "1"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MQTT broker 127.0.0.1:9"), "{err}");
}
