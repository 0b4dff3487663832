//! End-to-end tests of the energy meter and carbon-aware batch jobs, with real
//! processes: energy that grows with work and stays near zero when idle, the SCI of a
//! pipeline after a run, a deferrable job placed in the forecast's cleanest window, and
//! jobs that survive a restart of the control plane (kept, adopted, or run again).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Scratch;
use common::mesh::*;
use http::{Method, StatusCode};

/// Mesh tests start many processes; on a small machine they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn energy(cp: &str) -> serde_json::Value {
    Http::new().get(&format!("{cp}/api/v1/energy")).await.json()
}

fn pipeline<'a>(report: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    report["pipelines"]
        .as_array()?
        .iter()
        .find(|p| p["pipeline"] == name)
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

/// The CPU time (user + system) the kernel counted for process `pid`, in seconds.
fn process_cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command (which may hold spaces) start at the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / clock_ticks()
}

/// The number of clock ticks per second (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

/// The meter ticks every second and workers report every second: wait for both.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(2500)).await;
}

#[tokio::test]
async fn energy_grows_with_work_stays_near_zero_when_idle_and_gives_the_sci() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start(&[&[]], &[]).await;
    settle().await;
    let before_idle = energy(&mesh.cp_url).await;
    let j0 = pipeline(&before_idle, "clean").map_or(0.0, |p| f(p, "joules"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_idle = energy(&mesh.cp_url).await;
    let j1 = pipeline(&after_idle, "clean").map_or(0.0, |p| f(p, "joules"));
    let idle = j1 - j0;
    assert!(
        f(&after_idle, "idle_joules") > f(&before_idle, "idle_joules"),
        "the machine's idle energy is counted apart: {after_idle}"
    );

    let worker_cpu_before = process_cpu_seconds(mesh.workers[0].pid());
    let cpu_before = pipeline(&after_idle, "clean").map_or(0.0, |p| f(p, "cpu_seconds"));
    let stop = Arc::new(AtomicBool::new(false));
    let body = readings(5_000, 0.01, 7);
    let task = load(mesh.transform_url(), body, 3, stop.clone());
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = task.await.expect("load");
    assert_none_failed(&outcomes);
    settle().await;
    let r = energy(&mesh.cp_url).await;
    let clean = pipeline(&r, "clean").expect("the pipeline is accounted");
    let work = f(clean, "joules") - j1;
    assert!(work > 0.05, "4 s of load cost energy: {work} J\n{r}");
    assert!(
        idle < 0.3 && idle * 10.0 < work,
        "idle {idle} J against {work} J of work\n{r}"
    );
    // The CPU charged to the pipeline, against what the kernel says the worker's
    // process used: never more, and most of it (the rest is HTTP, heartbeats, idle
    // pipelines).
    let charged = f(clean, "cpu_seconds") - cpu_before;
    let used = process_cpu_seconds(mesh.workers[0].pid()) - worker_cpu_before;
    assert!(
        charged > 0.1 && charged <= used * 1.05 + 0.05 && charged >= used * 0.25,
        "charged {charged} s of CPU to the pipeline; the worker's process used {used} s\n{clean}"
    );

    // SCI = (E × I + M) per million records, with the fixed default intensity; the
    // records are the ones this test sent (every request answered 200).
    let records = clean["records"].as_u64().expect("records");
    assert_eq!(
        records,
        5_000 * outcomes.len() as u64,
        "records counted for {} requests of 5,000",
        outcomes.len()
    );
    let carbon = f(clean, "carbon_g");
    let expected_carbon = f(clean, "joules") * 475.0 / 3.6e6;
    assert!(
        (carbon - expected_carbon).abs() <= 1e-9 * expected_carbon.max(1.0),
        "{clean}"
    );
    let sci = f(clean, "sci_g_per_million_records");
    let expected = (carbon + f(clean, "embodied_g")) / records as f64 * 1e6;
    assert!(
        sci > 0.0 && (sci - expected).abs() <= 1e-9 * expected,
        "{sci} vs {expected}"
    );
    // `source: auto` reads RAPL where a package counter is readable, else the model:
    // what this machine has, looked up here.
    assert_eq!(
        r["source"],
        if rapl_readable() { "rapl" } else { "model" },
        "{r}"
    );

    // The same figures in the metrics, the overview and `etlmesh energy`.
    let metrics = Http::new()
        .get(&format!("{}/metrics", mesh.cp_url))
        .await
        .body;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics.contains("etlmesh_energy_joules_total{pipeline=\"clean\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("etlmesh_sci_grams_per_million_records{pipeline=\"clean\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("etlmesh_energy_source{source="),
        "{metrics}"
    );
    let overview = Http::new()
        .get(&format!("{}/api/v1/overview", mesh.cp_url))
        .await
        .json();
    assert!(
        pipeline(&overview["energy"], "clean").is_some(),
        "{overview}"
    );
    let out = mesh
        .scratch
        .etlmesh(&["energy", "--control-plane", &mesh.cp_url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("clean") && text.contains("SCI"), "{text}");
}

/// A free port (the control plane restarts on it; the gateway follows it there).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The pid of the `etlmesh run` writing `summary`.
fn run_pid(summary: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("\0run\0") && cmd.contains(summary)).then_some(pid)
    })
}

struct Jobs {
    gw: String,
}

impl Jobs {
    async fn get(&self, id: &str) -> serde_json::Value {
        let a = Http::new().get(&format!("{}/v1/jobs/{id}", self.gw)).await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&a.body)
        );
        a.json()
    }

    async fn wait_state(&self, id: &str, state: &str) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        eventually(
            Duration::from_secs(30),
            &format!("job {id} {state}"),
            async || {
                last = self.get(id).await;
                last["state"] == state
            },
        )
        .await;
        last
    }
}

fn submit(s: &Scratch, gw: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec![
        "job",
        "--gateway",
        gw,
        "--json",
        "submit",
        "--pipeline",
        "p",
    ];
    all.extend_from_slice(args);
    let out = s.etlmesh(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("job JSON")
}

fn write_fifo(path: std::path::PathBuf, data: bytes::Bytes) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || std::fs::write(path, data).expect("write the fifo"))
}

#[tokio::test]
async fn jobs_go_to_the_cleanest_window_and_survive_a_restart_of_the_control_plane() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    // Hourly forecast: 400 gCO2e/kWh, but 50 from the 6th to the 8th hour from now.
    let now = chrono::Utc::now().timestamp();
    let t0 = now - now % 3600;
    let mut csv = String::from("timestamp,value\n");
    for h in -1..30i64 {
        let t = chrono::DateTime::from_timestamp(t0 + h * 3600, 0).expect("time");
        let v = if (6..8).contains(&h) { 50 } else { 400 };
        csv.push_str(&format!("{},{v}\n", t.to_rfc3339()));
    }
    s.write("forecast.csv", csv);
    let yaml = common::readings_yaml(
        "SELECT device_id, ts, temperature_c FROM input WHERE status <> 'err'",
        "{ type: parquet, path: out }",
        "    dead_letter: { type: ndjson, path: dead }",
    )
    .replace(
        "platform:\n",
        "platform:\n  scaling: { min_replicas: 0 }\n  carbon: { forecast: forecast.csv }\n",
    );
    s.write("jobs.yaml", &yaml);
    let data = readings(500, 0.0, 3);
    s.write("data.csv", &data);
    for fifo in ["fifo1.csv", "fifo2.csv"] {
        let st = std::process::Command::new("mkfifo")
            .arg(s.path(fifo))
            .status()
            .expect("mkfifo");
        assert!(st.success());
    }
    let dir = s.dir.path();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let cp_args = [
        "control-plane",
        "--listen",
        &listen,
        "-c",
        "jobs.yaml",
        "--state-dir",
        "state",
    ];
    let cp = Proc::start(dir, &cp_args);
    let cp_url = cp.url("control plane");
    let gw = Proc::gateway(dir, &cp_url, &[]);
    let gw_url = gw.url("gateway");
    let jobs = Jobs { gw: gw_url.clone() };

    // A deferrable job due in 12 h, one hour long: the clean hours start at t0 + 6 h.
    let a = submit(
        &s,
        &gw_url,
        &["--deadline", "12h", "--duration", "1h", "data.csv"],
    );
    let a_id = a["id"].as_str().expect("id").to_string();
    assert_eq!(a["state"], "scheduled");
    let window = chrono::DateTime::from_timestamp(t0 + 6 * 3600, 0).expect("time");
    assert_eq!(
        a["scheduled_at"],
        window.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "{a}"
    );
    assert_eq!(f(&a, "expected_intensity"), 50.0, "{a}");
    assert_eq!(f(&a, "at_once_intensity"), 400.0, "{a}");

    // Two jobs that run at once and wait on their input (named pipes).
    let b = submit(&s, &gw_url, &["--now", "fifo1.csv"]);
    let c = submit(&s, &gw_url, &["--now", "fifo2.csv"]);
    let (b_id, c_id) = (b["id"].as_str().expect("id"), c["id"].as_str().expect("id"));
    jobs.wait_state(b_id, "running").await;
    jobs.wait_state(c_id, "running").await;

    // The control plane dies. The gateway says so; one run dies meanwhile.
    cp.signal(nix::sys::signal::Signal::SIGKILL);
    drop(cp);
    let down = Http::new().get(&format!("{gw_url}/v1/jobs")).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!down.header("retry-after").is_empty());
    let c_summary = format!("{c_id}.summary.json");
    let c_pid = run_pid(&c_summary).expect("job C's run is still there");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    assert!(
        run_pid(&format!("{b_id}.summary.json")).is_some(),
        "job B's run lives on"
    );

    // A new control plane on the same port and state directory.
    let cp2 = Proc::start(dir, &cp_args);
    cp2.url("control plane");
    eventually(
        Duration::from_secs(20),
        "the gateway reaches the new control plane",
        async || Http::new().get(&format!("{gw_url}/v1/jobs")).await.status == StatusCode::OK,
    )
    .await;
    let a2 = jobs.get(&a_id).await;
    assert_eq!(
        (&a2["state"], &a2["scheduled_at"]),
        (&a["state"], &a["scheduled_at"]),
        "{a2}"
    );
    let b2 = jobs.get(b_id).await;
    assert_eq!(
        (b2["state"].as_str(), b2["attempts"].as_u64()),
        (Some("running"), Some(1)),
        "B is adopted: {b2}"
    );
    // C's run died: it runs again (attempt 2), waiting on its pipe again.
    let c2 = jobs.wait_state(c_id, "running").await;
    assert_eq!(c2["attempts"], 2, "{c2}");
    assert!(
        c2["placement"].as_str().unwrap_or("").contains("run again"),
        "{c2}"
    );

    write_fifo(s.path("fifo1.csv"), data.clone())
        .await
        .expect("fifo1");
    let b3 = jobs.wait_state(b_id, "succeeded").await;
    assert_eq!(b3["summary"]["records_in"], 500, "{b3}");
    assert_eq!(b3["attempts"], 1);
    write_fifo(s.path("fifo2.csv"), data.clone())
        .await
        .expect("fifo2");
    let c3 = jobs.wait_state(c_id, "succeeded").await;
    assert_eq!(
        (
            c3["attempts"].as_u64(),
            c3["summary"]["records_in"].as_u64()
        ),
        (Some(2), Some(500)),
        "{c3}"
    );
    assert!(
        f(&c3, "cpu_seconds") > 0.0 && f(&c3, "joules") > 0.0,
        "a job's energy: {c3}"
    );

    // Cancel the deferred one; a second cancel is refused; the list has all three.
    let out = s.etlmesh(&["job", "--gateway", &gw_url, "cancel", &a_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(jobs.get(&a_id).await["state"], "cancelled");
    let again = Http::new()
        .send(
            Method::DELETE,
            &format!("{gw_url}/v1/jobs/{a_id}"),
            &[],
            bytes::Bytes::new(),
        )
        .await
        .expect("answer");
    assert_eq!(again.status, StatusCode::CONFLICT);
    let out = s.etlmesh(&["job", "--gateway", &gw_url, "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for id in [a_id.as_str(), b_id, c_id] {
        assert!(text.contains(id), "{text}");
    }

    // The pool of `p` sits at zero workers: the energy that saved is reported, and the
    // jobs' work is charged to `p` with its records.
    settle().await;
    let r = energy(&cp_url).await;
    assert!(f(&r["avoided"], "worker_seconds") > 0.0, "{r}");
    assert!(f(&r["avoided"], "joules") > 0.0, "{r}");
    let p = pipeline(&r, "p").expect("p is charged for its jobs");
    assert!(p["records"].as_u64().unwrap_or(0) >= 500, "{p}");
    let bad = Http::new()
        .send(
            Method::POST,
            &format!("{gw_url}/v1/jobs"),
            &[],
            bytes::Bytes::from_static(br#"{"pipeline":"nope","inputs":["x.csv"]}"#),
        )
        .await
        .expect("answer");
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&bad.body).contains("no pipeline `nope`"));
    drop(gw);
    drop(cp2);
}

/// A powercap tree whose package counter a thread advances at `watts`, wrapping at
/// `max` microjoules, until `stop`.
fn fake_rapl(
    dir: std::path::PathBuf,
    watts: u64,
    max: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let zone = dir.join("intel-rapl:0");
    std::fs::create_dir_all(&zone).expect("zone");
    std::fs::write(zone.join("name"), "package-0\n").expect("name");
    std::fs::write(zone.join("max_energy_range_uj"), format!("{max}\n")).expect("max");
    let start = max - 3_000_000; // wraps after 3 J
    std::fs::write(zone.join("energy_uj"), format!("{start}\n")).expect("energy");
    std::thread::spawn(move || {
        let mut uj = start;
        let mut total = 0;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            let step = watts * 50_000; // µJ in 50 ms
            uj = (uj + step) % max;
            total += step;
            // Written whole and renamed, as the kernel's file never shows half a number.
            let tmp = zone.join("energy_uj.tmp");
            std::fs::write(&tmp, format!("{uj}\n")).expect("write");
            std::fs::rename(&tmp, zone.join("energy_uj")).expect("rename");
        }
        total
    })
}

#[tokio::test]
async fn the_meter_reads_rapl_when_the_file_asks_for_it() {
    let _serial = SERIAL.lock().await;
    let s = Scratch::new();
    let yaml = common::readings_yaml("SELECT * FROM input", "{ type: stdout }", "").replace(
        "platform:\n",
        "platform:\n  scaling: { min_replicas: 0 }\n  energy: { source: rapl, powercap: powercap }\n",
    );
    s.write("rapl.yaml", &yaml);
    // No counter: `source: rapl` refuses to start, saying why.
    let out = s.etlmesh(&[
        "control-plane",
        "--listen",
        "127.0.0.1:0",
        "-c",
        "rapl.yaml",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no RAPL counter") && err.contains("source: auto"),
        "{err}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writer = fake_rapl(s.path("powercap"), 40, 262_143_328_850, stop.clone());
    let cp = Proc::start(
        s.dir.path(),
        &[
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "-c",
            "rapl.yaml",
            "--state-dir",
            "state",
        ],
    );
    let cp_url = cp.url("control plane");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = energy(&cp_url).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().expect("writer") as f64 / 1e6;
    assert_eq!(r["source"], "rapl", "{r}");
    assert!(
        r["detail"].as_str().unwrap_or("").contains("intel-rapl:0"),
        "{r}"
    );
    // About 40 W for the seconds metered (the counter wrapped after 3 J).
    let joules = f(&r, "joules_total");
    assert!(
        joules > 0.5 * 40.0 * f(&r, "seconds") && joules <= written + 1e-6,
        "{joules} J of {written} J written\n{r}"
    );
    assert!((f(&r, "power_watts") - 40.0).abs() < 20.0, "{r}");
    let metrics = Http::new().get(&format!("{cp_url}/metrics")).await.body;
    assert!(String::from_utf8_lossy(&metrics).contains("etlmesh_energy_source{source=\"rapl\"} 1"));
}

/// Whether a RAPL package counter of this machine can be read (not `psys`).
fn rapl_readable() -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/class/powercap") else {
        return false;
    };
    dir.filter_map(Result::ok).any(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        let package = name
            .strip_prefix("intel-rapl:")
            .is_some_and(|rest| !rest.contains(':'));
        let kind = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        package
            && kind.trim() != "psys"
            && std::fs::read_to_string(e.path().join("energy_uj"))
                .is_ok_and(|v| v.trim().parse::<u64>().is_ok())
    })
}
