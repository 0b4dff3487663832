//! The routing rules, without sockets: who gets what, what is kept, what is dropped.

use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::wire::Version;

fn core(max_queued: usize) -> Core {
    Core::new(
        Limits {
            max_queued,
            max_queued_bytes: 1 << 20,
            max_inflight: 100,
            max_session_expiry: Duration::from_secs(3600),
            max_connections: 10,
            max_retained: 10,
        },
        Metrics::default(),
        1 << 20,
    )
}

fn connect(c: &Core, id: &str, clean: bool) -> Attached {
    c.connect(&Connect {
        version: Version::V5,
        client_id: id.into(),
        clean_start: clean,
        keep_alive: 0,
        session_expiry: Some(if clean { 0 } else { 3600 }),
        receive_maximum: None,
        max_packet: None,
        login: None,
        will: None,
    })
    .expect("accepted")
}

fn publish(c: &Core, topic: &str, body: &str) {
    assert!(c.publish(Publish {
        topic: topic.into(),
        payload: Bytes::from(body.to_string()),
        qos: 1,
        retain: false,
        dup: false,
        pkid: 1,
    }));
}

fn take(c: &Core, a: &Attached) -> Vec<(u16, String, bool)> {
    let mut out = Vec::new();
    c.fill(&a.client_id, a.conn, &mut out, usize::MAX)
        .expect("owns its session");
    out.into_iter()
        .map(|p| {
            (
                p.pkid,
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.dup,
            )
        })
        .collect()
}

#[test]
fn a_shared_group_gets_each_message_once_round_robin() {
    let c = core(100);
    let (a, b) = (connect(&c, "a", true), connect(&c, "b", true));
    for x in [&a, &b] {
        assert_eq!(
            c.subscribe(&x.client_id, &[("$share/g/t/+".into(), 1)]),
            vec![Some(1)]
        );
    }
    for i in 0..4 {
        publish(&c, "t/x", &i.to_string());
    }
    let (ga, gb) = (take(&c, &a), take(&c, &b));
    assert_eq!(ga.len() + gb.len(), 4);
    assert_eq!((ga.len(), gb.len()), (2, 2));
}

#[test]
fn unacknowledged_messages_come_again_with_dup_after_a_reconnect() {
    let c = core(100);
    let a = connect(&c, "w", false);
    c.subscribe("w", &[("t".into(), 1)]);
    publish(&c, "t", "one");
    publish(&c, "t", "two");
    let first = take(&c, &a);
    assert_eq!(first.len(), 2);
    c.acked("w", first[0].0);
    // kill -9: no DISCONNECT.
    c.disconnect("w", a.conn, false, None);
    publish(&c, "t", "three"); // kept for the offline persistent session
    let again = connect(&c, "w", false);
    assert!(again.session_present);
    let got = take(&c, &again);
    assert_eq!(
        got.iter().map(|g| (g.1.as_str(), g.2)).collect::<Vec<_>>(),
        vec![("two", true), ("three", false)]
    );
}

#[test]
fn a_shared_member_that_leaves_for_good_hands_its_messages_to_the_group() {
    let c = core(100);
    let (a, b) = (connect(&c, "a", true), connect(&c, "b", true));
    for x in [&a, &b] {
        c.subscribe(&x.client_id, &[("$share/g/t".into(), 1)]);
    }
    publish(&c, "t", "m1");
    publish(&c, "t", "m2");
    let ga = take(&c, &a);
    assert_eq!(ga.len(), 1);
    c.disconnect("a", a.conn, false, None); // clean session: gone
    let gb = take(&c, &b);
    let mut bodies: Vec<_> = gb.iter().map(|g| g.1.clone()).collect();
    bodies.sort();
    assert_eq!(bodies, vec!["m1", "m2"]);
}

#[test]
fn a_full_session_drops_new_messages_and_keeps_the_old() {
    let c = core(3);
    let _a = connect(&c, "slow", false);
    c.subscribe("slow", &[("t".into(), 1)]);
    for i in 0..5 {
        publish(&c, "t", &i.to_string());
    }
    let st = c.state.lock();
    let s = &st.sessions["slow"];
    assert_eq!(
        s.queue.iter().map(|m| &*m.payload).collect::<Vec<_>>(),
        vec![b"0", b"1", b"2"]
    );
}

#[test]
fn a_second_connection_takes_the_session_over() {
    let c = core(10);
    let old = connect(&c, "x", false);
    let new = connect(&c, "x", false);
    let mut out = Vec::new();
    assert!(
        c.fill("x", old.conn, &mut out, 1).is_none(),
        "the old one lost it"
    );
    assert!(c.fill("x", new.conn, &mut out, 1).is_some());
    // The old connection's end does not end the new one's session.
    c.disconnect("x", old.conn, false, None);
    assert_eq!(c.state.lock().sessions["x"].owner, Some(new.conn));
    assert_eq!(c.state.lock().connections, 1);
}

#[test]
fn retained_messages_reach_later_subscribers_and_an_empty_one_clears() {
    let c = core(10);
    let a = connect(&c, "a", true);
    c.publish(Publish {
        topic: "cfg/x".into(),
        payload: Bytes::from_static(b"v1"),
        qos: 1,
        retain: true,
        dup: false,
        pkid: 1,
    });
    c.subscribe("a", &[("cfg/#".into(), 1)]);
    assert_eq!(take(&c, &a)[0].1, "v1");
    c.publish(Publish {
        topic: "cfg/x".into(),
        payload: Bytes::new(),
        qos: 0,
        retain: true,
        dup: false,
        pkid: 0,
    });
    let b = connect(&c, "b", true);
    c.subscribe("b", &[("cfg/#".into(), 1)]);
    assert!(take(&c, &b).is_empty());
}

#[test]
fn a_will_is_sent_on_a_broken_connection_only() {
    let c = core(10);
    let sub = connect(&c, "sub", true);
    c.subscribe("sub", &[("wills/#".into(), 1)]);
    for (id, graceful) in [("w1", true), ("w2", false)] {
        let mut con = Connect {
            version: Version::V4,
            client_id: id.into(),
            clean_start: true,
            keep_alive: 0,
            session_expiry: Some(0),
            receive_maximum: None,
            max_packet: None,
            login: None,
            will: None,
        };
        con.will = Some(Will {
            topic: format!("wills/{id}"),
            payload: Bytes::from_static(b"gone"),
            qos: 1,
            retain: false,
        });
        let a = c.connect(&con).expect("accepted");
        c.disconnect(id, a.conn, graceful, None);
    }
    let got = take(&c, &sub);
    assert_eq!(got.len(), 1, "{got:?}");
}

#[test]
fn a_v4_client_without_an_id_needs_a_clean_session() {
    let c = core(10);
    let mut con = Connect {
        version: Version::V4,
        client_id: String::new(),
        clean_start: false,
        keep_alive: 0,
        session_expiry: None,
        receive_maximum: None,
        max_packet: None,
        login: None,
        will: None,
    };
    assert_eq!(c.connect(&con).map(|_| ()), Err(Refusal::BadClientId));
    con.clean_start = true;
    assert!(c.connect(&con).expect("accepted").assigned);
}

#[test]
fn the_window_bounds_what_is_in_flight() {
    let c = core(1000);
    let a = c
        .connect(&Connect {
            version: Version::V5,
            client_id: "w".into(),
            clean_start: true,
            keep_alive: 0,
            session_expiry: Some(0),
            receive_maximum: Some(3),
            max_packet: None,
            login: None,
            will: None,
        })
        .expect("accepted");
    c.subscribe("w", &[("t".into(), 1)]);
    for i in 0..10 {
        publish(&c, "t", &i.to_string());
    }
    let first = take(&c, &a);
    assert_eq!(first.len(), 3);
    assert!(take(&c, &a).is_empty(), "nothing more until an ack");
    c.acked("w", first[0].0);
    assert_eq!(take(&c, &a).len(), 1);
}

#[test]
fn leaving_a_shared_group_hands_over_what_was_not_sent_yet() {
    let c = core(100);
    let (a, b) = (connect(&c, "a", false), connect(&c, "b", false));
    for x in [&a, &b] {
        c.subscribe(&x.client_id, &[("$share/g/t".into(), 1)]);
    }
    for i in 0..6 {
        publish(&c, "t", &i.to_string());
    }
    let first = take(&c, &a); // a received its share: 3
    publish(&c, "t", "late-a"); // round robin: queued for a, not sent yet
    publish(&c, "t", "late-b");
    c.unsubscribe("a", &["$share/g/t".into()]);
    let got_b = take(&c, &b);
    assert_eq!(first.len(), 3);
    assert_eq!(got_b.len(), 5, "{got_b:?}");
    assert!(take(&c, &a).is_empty());
}
