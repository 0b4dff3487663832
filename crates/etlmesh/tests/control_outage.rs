//! The control plane goes away (kill -9) and comes back on the same address and state
//! directory: the gateway keeps serving from its last endpoint set and says so
//! (`/readyz` with `control_plane: false`, `etlmesh_gateway_control_plane_connected
//! 0`), no request fails meanwhile, and once the control plane is back the worker is
//! registered again and the gateway follows it again.

mod common;

use std::time::{Duration, Instant};

use common::Scratch;
use common::mesh::*;
use http::StatusCode;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn control_plane(dir: &std::path::Path, port: u16) -> Proc {
    Proc::start(
        dir,
        &[
            "control-plane",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--state-dir",
            "st",
        ],
    )
}

async fn ready(http: &Http, gw: &str) -> serde_json::Value {
    http.get(&format!("{gw}/readyz")).await.json()
}

async fn connected_metric(http: &Http, gw: &str) -> Option<f64> {
    let text = String::from_utf8_lossy(&http.get(&format!("{gw}/metrics")).await.body).into_owned();
    text.lines()
        .find(|l| l.starts_with("etlmesh_gateway_control_plane_connected "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Requests through the gateway for `for_`: every answer must be 200.
async fn all_answered(http: &Http, url: &str, for_: Duration) -> usize {
    let until = Instant::now() + for_;
    let mut n = 0;
    while Instant::now() < until {
        let a = http
            .post_csv(url, readings(20, 0.0, n as u64))
            .await
            .expect("an answer");
        assert_eq!(
            a.status,
            StatusCode::OK,
            "request {n}: {:?}",
            String::from_utf8_lossy(&a.body)
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_through_a_control_plane_restart() {
    let scratch = Scratch::new();
    let dir = scratch.dir.path();
    scratch.write("mesh.yaml", MESH_YAML);
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let mut cp = control_plane(dir, port);
    cp.url("control plane");
    let gw = Proc::gateway(dir, &admin, &[]);
    let _worker = Proc::worker(dir, "mesh.yaml", "w1", &admin, &[]);
    let gw_url = gw.url("gateway");
    let url = format!("{gw_url}/v1/pipelines/clean");
    let http = Http::new();
    eventually(
        Duration::from_secs(20),
        "the gateway routes to the worker",
        async || {
            http.post_csv(&url, readings(5, 0.0, 1))
                .await
                .is_ok_and(|a| a.status == StatusCode::OK)
        },
    )
    .await;
    assert_eq!(ready(&http, &gw_url).await["control_plane"], true);
    assert_eq!(connected_metric(&http, &gw_url).await, Some(1.0));

    cp.signal(nix::sys::signal::Signal::SIGKILL);
    cp.exit_within(Duration::from_secs(5)).await;
    eventually(Duration::from_secs(10), "the gateway notices", async || {
        ready(&http, &gw_url).await["control_plane"] == false
    })
    .await;
    let r = ready(&http, &gw_url).await;
    assert_eq!(
        r["status"], "ready",
        "still ready, from the last endpoint set: {r}"
    );
    assert_eq!(connected_metric(&http, &gw_url).await, Some(0.0));
    let served = all_answered(&http, &url, Duration::from_secs(3)).await;
    assert!(
        served > 10,
        "{served} requests while the control plane was away"
    );

    let _cp = control_plane(dir, port);
    eventually(
        Duration::from_secs(20),
        "the gateway follows it again",
        async || ready(&http, &gw_url).await["control_plane"] == true,
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the worker registered again",
        async || {
            http.send(
                http::Method::GET,
                &format!("{admin}/api/v1/workers"),
                &[],
                Default::default(),
            )
            .await
            .is_ok_and(|a| {
                a.json()
                    .as_array()
                    .is_some_and(|w| w.iter().any(|w| w["id"] == "w1"))
            })
        },
    )
    .await;
    all_answered(&http, &url, Duration::from_secs(2)).await;
    assert_eq!(connected_metric(&http, &gw_url).await, Some(1.0));
}
