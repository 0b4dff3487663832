//! Dead letters replayed with the real binary: a batch run dead-letters rows the
//! pipeline cannot read, `etlmesh deadletters list` shows them, a replay through the
//! unchanged pipeline fails again (new letters, nothing lost), and a replay through the
//! fixed pipeline loads them into its sink once — a second replay finds nothing.

mod common;

use common::*;

const INPUT: &str = "device_id,ts,temperature_c,humidity,battery_v,status
d1,2026-11-26T08:00:00.001Z,21.5,40.0,3.9,ok
d2,2026-11-26T08:00:00.002Z,n/a,41.0,3.9,ok
d3,2026-11-26T08:00:00.003Z,22.5,42.0,3.9,ok
d4,2026-11-26T08:00:00.004Z,n/a,43.0,3.9,ok
d5,2026-11-26T08:00:00.005Z,23.5,44.0,3.9,ok,extra
";

const SQL: &str = "SELECT device_id, ts, CAST(temperature_c AS DOUBLE) AS temperature_c, humidity, status FROM input";

/// The pipeline file, with `temperature_c` read as `temperature`'s type.
fn pipeline(temperature: &str, sql: &str) -> String {
    readings_yaml(
        sql,
        "{ type: parquet, path: out }",
        "    dead_letter: { type: ndjson, path: dead }\n",
    )
    .replace(
        "temperature_c: float64",
        &format!("temperature_c: {temperature}"),
    )
}

/// `etlmesh deadletters replay` of the temperature letters, with `extra` arguments.
fn replay(s: &Scratch, extra: &[&str]) -> String {
    let mut args = vec![
        "deadletters",
        "replay",
        "-c",
        "p.yaml",
        "p",
        "--where",
        "field=temperature_c",
    ];
    args.extend_from_slice(extra);
    ok(s, &args)
}

fn ok(s: &Scratch, args: &[&str]) -> String {
    let o = s.etlmesh(args);
    assert!(o.status.success(), "etlmesh {args:?}:\n{}", text(&o.stderr));
    text(&o.stdout)
}

#[test]
fn dead_letters_fail_again_until_the_pipeline_is_fixed_then_load_once() {
    let s = Scratch::new();
    s.write("in.csv", INPUT);
    s.write("p.yaml", pipeline("float64", SQL));
    let sum = s.run_ok("p.yaml", "p", &["in.csv"]);
    assert_eq!((n(&sum["records_out"]), n(&sum["dead_lettered"])), (2, 3));

    let list = ok(&s, &["deadletters", "list", "-c", "p.yaml", "p"]);
    assert!(list.contains("3 dead letters of pipeline p"), "{list}");
    assert!(list.contains("cannot read \"n/a\" as float64"), "{list}");

    // The unchanged pipeline refuses them again: new letters, none lost.
    let again = replay(&s, &[]);
    assert!(again.contains("0 replayed, 2 failed again"), "{again}");
    let letters = read_ndjson_dir(&s.path("dead"));
    let live: Vec<_> = letters
        .iter()
        .filter(|l| l.get("replay_run").is_none())
        .collect();
    assert_eq!(live.len(), 5, "3 first letters and 2 new ones: {letters:?}");

    // Fixed: the temperature is read as text and cast by the SQL (NULL when not a number).
    let fixed = "SELECT device_id, ts, TRY_CAST(temperature_c AS DOUBLE) AS temperature_c, humidity, status FROM input";
    s.write("p.yaml", pipeline("utf8", fixed));
    let dry = replay(&s, &["--dry-run"]);
    assert!(dry.contains("2 replayed"), "{dry}");
    assert_eq!(
        rows(&read_parquet_dir(&s.path("out"))),
        2,
        "a dry run loads nothing"
    );
    let done = replay(&s, &[]);
    assert!(done.contains("2 replayed, 0 failed again"), "{done}");
    let out = read_parquet_dir(&s.path("out"));
    assert_eq!(
        rows(&out),
        4,
        "the two replayed rows joined the two first ones"
    );

    let twice = replay(&s, &[]);
    assert!(
        twice.contains("no dead letters of pipeline p to replay"),
        "{twice}"
    );
    assert_eq!(rows(&read_parquet_dir(&s.path("out"))), 4, "replayed once");
    // The line with an extra field is still there, untouched.
    let left = ok(&s, &["deadletters", "show", "-c", "p.yaml", "p"]);
    assert!(left.contains("expected 6 fields, found 7"), "{left}");
    assert_eq!(
        left.lines().filter(|l| l.starts_with('{')).count(),
        1,
        "{left}"
    );
}

/// SHA-256 of `s3cret`, the token of the API test.
const TOKEN_SHA256: &str = "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_through_the_api_with_a_token() {
    use bytes::Bytes;
    use common::mesh::{Http, Proc};
    use http::{Method, StatusCode};

    let s = Scratch::new();
    s.write("in.csv", INPUT);
    s.write("p.yaml", pipeline("float64", SQL));
    let sum = s.run_ok("p.yaml", "p", &["in.csv"]);
    assert_eq!(n(&sum["dead_lettered"]), 3);
    // Fixed, with a token that may run jobs of `p` (the dashboard asks for it).
    let fixed = "SELECT device_id, ts, TRY_CAST(temperature_c AS DOUBLE) AS temperature_c, humidity, status FROM input";
    s.write(
        "p.yaml",
        pipeline("utf8", fixed).replacen(
            "platform:\n",
            &format!("platform:\n  access: {{ tokens: [ {{ name: ops, sha256: {TOKEN_SHA256}, pipelines: [p], jobs: true }} ] }}\n"),
            1,
        ),
    );
    let up = Proc::up(s.dir.path(), &["-c", "p.yaml", "--workers", "1"]);
    let admin = up.url("control plane");
    let http = Http::new();

    let list = http
        .get(&format!(
            "{admin}/api/v1/deadletters/p?where=field%3Dtemperature_c"
        ))
        .await;
    assert_eq!(list.status, StatusCode::OK, "{}", text(&list.body));
    let list = list.json();
    assert_eq!(list["total"], 2, "{list:#}");
    assert!(
        list["reasons"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("\"n/a\""),
        "{list:#}"
    );
    let unknown = http.get(&format!("{admin}/api/v1/deadletters/nope")).await;
    assert_eq!(
        unknown.status,
        StatusCode::NOT_FOUND,
        "{}",
        text(&unknown.body)
    );

    let url = format!("{admin}/api/v1/deadletters/p/replay");
    let body = |dry: bool| {
        Bytes::from(format!(
            r#"{{"where": ["field=temperature_c"], "dry_run": {dry}}}"#
        ))
    };
    let json = [("content-type", "application/json")];
    let anonymous = http
        .send(Method::POST, &url, &json, body(false))
        .await
        .expect("POST");
    assert_eq!(
        anonymous.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        text(&anonymous.body)
    );
    let with = [
        ("content-type", "application/json"),
        ("authorization", "Bearer s3cret"),
    ];
    let dry = http
        .send(Method::POST, &url, &with, body(true))
        .await
        .expect("POST");
    assert_eq!(dry.status, StatusCode::OK, "{}", text(&dry.body));
    let dry = dry.json();
    assert_eq!(
        (dry["replayed"].as_u64(), dry["dry_run"].as_bool()),
        (Some(2), Some(true)),
        "{dry:#}"
    );
    assert_eq!(
        rows(&read_parquet_dir(&s.path("out"))),
        2,
        "a dry run loads nothing"
    );

    let done = http
        .send(Method::POST, &url, &with, body(false))
        .await
        .expect("POST")
        .json();
    assert_eq!(
        (
            done["replayed"].as_u64(),
            done["failed"].as_u64(),
            done["rows_out"].as_u64()
        ),
        (Some(2), Some(0), Some(2)),
        "{done:#}"
    );
    assert_eq!(
        rows(&read_parquet_dir(&s.path("out"))),
        4,
        "replayed into the sink"
    );
    let again = http
        .send(Method::POST, &url, &with, body(false))
        .await
        .expect("POST")
        .json();
    assert_eq!(again["letters"], 0, "nothing left to replay: {again:#}");
    assert!(
        up.output()
            .contains("dead letters replayed through the API"),
        "{}",
        up.output()
    );

    // The dashboard lists the letters left (the line with an extra field) by reason.
    if let Some(browser) = common::chromium() {
        let html = common::dump_dom(&browser, &format!("{admin}/ui#deadletters=p")).await;
        assert!(
            html.contains("class=\"dl-reason\""),
            "no reason drawn:\n{html}"
        );
        assert!(html.contains("expected 6 fields, found 7"), "{html}");
    }
}
