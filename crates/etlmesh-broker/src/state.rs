//! The broker's state, behind one lock: sessions (with their subscriptions, queued and
//! unacknowledged messages), the subscription index, and retained messages.
//!
//! Invariants:
//! - a session is owned by at most one connection (`owner`); a newer CONNECT with the
//!   same client id takes it over and the older connection, woken, sees that it lost
//!   it and closes;
//! - what a session holds (queued and in flight) is bounded by `max_queued` messages
//!   and `max_queued_bytes` of payload; past either, new messages for it are dropped
//!   and counted, never an unbounded queue;
//! - a QoS 1 message leaves a session only when its PUBACK comes; after a reconnect
//!   the unacknowledged ones are sent again first (with DUP);
//! - a message that came through a shared subscription and was not acknowledged when
//!   its session ends goes to another member of the group.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::topic::{Subscription, matches, valid_topic};
use crate::wire::{Connect, Publish, Refusal, Will};

/// Packet ids a session may have in flight at once (ids are 16 bits and never reused
/// while unacknowledged).
const MAX_PKIDS: usize = 65_000;

/// The bounds the broker keeps to.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_queued: usize,
    pub max_queued_bytes: u64,
    pub max_inflight: u16,
    pub max_session_expiry: Duration,
    pub max_connections: usize,
    pub max_retained: usize,
}

/// A message on its way to one session.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    topic: Arc<str>,
    payload: Bytes,
    qos: u8,
    retain: bool,
    /// (group, filter) when it came through a shared subscription.
    share: Option<Arc<(String, String)>>,
}

impl Message {
    fn size(&self) -> u64 {
        self.payload.len() as u64 + self.topic.len() as u64
    }
}

struct Session {
    owner: Option<u64>,
    wake: Arc<Notify>,
    /// As the client wrote them, with the granted QoS.
    subs: HashMap<String, (Subscription, u8)>,
    queue: VecDeque<Message>,
    inflight: BTreeMap<u16, Message>,
    /// Payload bytes queued and in flight.
    held_bytes: u64,
    next_pkid: u16,
    /// Sent again from the start of `inflight` on the next fill (after a reconnect).
    resend: bool,
    expiry: Duration,
    gone_since: Option<Instant>,
    will: Option<Will>,
    receive_max: usize,
    max_packet: u32,
    /// QoS 2 publishes received and not yet released (PUBREC sent, PUBREL awaited).
    qos2: HashSet<u16>,
    last_drop_warning: Option<Instant>,
}

impl Session {
    fn new() -> Self {
        Self {
            owner: None,
            wake: Arc::new(Notify::new()),
            subs: HashMap::new(),
            queue: VecDeque::new(),
            inflight: BTreeMap::new(),
            held_bytes: 0,
            next_pkid: 1,
            resend: false,
            expiry: Duration::ZERO,
            gone_since: None,
            will: None,
            receive_max: 1,
            max_packet: u32::MAX,
            qos2: HashSet::new(),
            last_drop_warning: None,
        }
    }

    fn held(&self) -> usize {
        self.queue.len() + self.inflight.len()
    }

    fn has_room(&self, limits: &Limits, msg: &Message) -> bool {
        self.held() < limits.max_queued && self.held_bytes + msg.size() <= limits.max_queued_bytes
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }
}

#[derive(Default)]
struct Group {
    members: Vec<(String, u8)>,
    next: usize,
}

#[derive(Default)]
struct Entry {
    direct: HashMap<String, u8>,
    groups: BTreeMap<String, Group>,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.groups.is_empty()
    }
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    filters: HashMap<String, Entry>,
    retained: BTreeMap<String, Message>,
    connections: usize,
    next_conn: u64,
}

/// What a connection gets when its CONNECT is accepted.
#[derive(Debug)]
pub(crate) struct Attached {
    pub conn: u64,
    pub client_id: String,
    pub assigned: bool,
    pub wake: Arc<Notify>,
    pub session_present: bool,
    pub expiry: Duration,
    pub receive_max: u16,
}

/// The broker's shared state and its bounds.
pub(crate) struct Core {
    state: Mutex<State>,
    pub limits: Limits,
    pub metrics: Metrics,
    /// The largest packet read or written.
    pub max_packet: u32,
}

impl Core {
    pub fn new(limits: Limits, metrics: Metrics, max_packet: u32) -> Self {
        Self {
            state: Mutex::new(State::default()),
            limits,
            metrics,
            max_packet,
        }
    }

    /// Attaches a connection to its session (new, resumed or taken over).
    pub fn connect(&self, c: &Connect) -> Result<Attached, Refusal> {
        let mut st = self.state.lock();
        if st.connections >= self.limits.max_connections {
            return Err(Refusal::Unavailable);
        }
        let (client_id, assigned) = if c.client_id.is_empty() {
            if !c.clean_start && c.version == crate::wire::Version::V4 {
                return Err(Refusal::BadClientId);
            }
            (format!("etlmesh-{:016x}", rand::random::<u64>()), true)
        } else {
            (c.client_id.clone(), false)
        };
        let expiry = c
            .session_expiry
            .map_or(self.limits.max_session_expiry, |s| {
                Duration::from_secs(u64::from(s)).min(self.limits.max_session_expiry)
            });
        st.next_conn += 1;
        let conn = st.next_conn;
        if let Some(s) = st.sessions.get_mut(&client_id)
            && s.owner.take().is_some()
        {
            // Taken over: the old connection wakes, sees it lost the session, and closes.
            s.wake.notify_one();
            s.wake = Arc::new(Notify::new());
            st.connections -= 1;
            tracing::info!(client = %client_id, "MQTT session taken over by a new connection");
        }
        if c.clean_start {
            self.remove_session(&mut st, &client_id);
        }
        let present = st.sessions.contains_key(&client_id);
        let s = st
            .sessions
            .entry(client_id.clone())
            .or_insert_with(Session::new);
        s.owner = Some(conn);
        s.gone_since = None;
        s.expiry = expiry;
        s.will = c.will.clone();
        s.resend = !s.inflight.is_empty();
        let receive_max = c
            .receive_maximum
            .unwrap_or(u16::MAX)
            .min(self.limits.max_inflight)
            .max(1);
        s.receive_max = usize::from(receive_max).min(MAX_PKIDS);
        s.max_packet = c.max_packet.unwrap_or(u32::MAX);
        let wake = s.wake.clone();
        wake.notify_one();
        st.connections += 1;
        self.metrics.connections.set(st.connections as i64);
        self.metrics.sessions.set(st.sessions.len() as i64);
        Ok(Attached {
            conn,
            client_id,
            assigned,
            wake,
            session_present: present && !c.clean_start,
            expiry,
            receive_max,
        })
    }

    /// The connection `conn` of `client` ended; `graceful`: with a DISCONNECT (no will).
    pub fn disconnect(&self, client: &str, conn: u64, graceful: bool, expiry: Option<u32>) {
        let mut st = self.state.lock();
        let Some(s) = st.sessions.get_mut(client) else {
            return;
        };
        if s.owner != Some(conn) {
            return; // taken over: the session is another connection's now
        }
        s.owner = None;
        s.gone_since = Some(Instant::now());
        if let Some(e) = expiry {
            s.expiry = Duration::from_secs(u64::from(e)).min(self.limits.max_session_expiry);
        }
        let will = s.will.take().filter(|_| !graceful);
        let remove = s.expiry.is_zero();
        st.connections -= 1;
        if remove {
            self.remove_session(&mut st, client);
        }
        if let Some(w) = will {
            self.route(
                &mut st,
                Publish {
                    topic: w.topic,
                    payload: w.payload,
                    qos: w.qos,
                    retain: w.retain,
                    dup: false,
                    pkid: 0,
                },
            );
        }
        self.metrics.connections.set(st.connections as i64);
        self.metrics.sessions.set(st.sessions.len() as i64);
    }

    /// Drops sessions whose expiry passed.
    pub fn reap(&self) {
        let mut st = self.state.lock();
        let now = Instant::now();
        let expired: Vec<String> = st
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.gone_since
                    .is_some_and(|g| now.duration_since(g) >= s.expiry)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for c in &expired {
            tracing::info!(client = %c, "MQTT session expired");
            self.remove_session(&mut st, c);
        }
        self.metrics.sessions.set(st.sessions.len() as i64);
        let held: usize = st.sessions.values().map(Session::held).sum();
        self.metrics.held.set(held as i64);
    }

    /// Removes a session and its subscriptions; what it held through a shared
    /// subscription goes to the group's other members.
    fn remove_session(&self, st: &mut State, client: &str) {
        let Some(s) = st.sessions.remove(client) else {
            return;
        };
        for (sub, _) in s.subs.values() {
            unindex(&mut st.filters, client, sub);
        }
        let mut moved = 0;
        for msg in s.inflight.into_values().chain(s.queue) {
            if let Some(share) = msg.share.clone() {
                moved += 1;
                self.deliver_shared(st, &share, msg);
            }
        }
        if moved > 0 {
            tracing::info!(
                client,
                moved,
                "a shared subscriber's session ended: its unacknowledged messages went to the rest of the group"
            );
        }
    }

    /// A message from a client: routed to every matching subscription; retained when
    /// asked. `false` when the topic is not one a client may publish to.
    pub fn publish(&self, p: Publish) -> bool {
        if !valid_topic(&p.topic) {
            return false;
        }
        self.metrics.received.inc();
        let mut st = self.state.lock();
        self.route(&mut st, p);
        true
    }

    fn route(&self, st: &mut State, p: Publish) {
        let topic: Arc<str> = Arc::from(p.topic.as_str());
        let base = Message {
            topic,
            payload: p.payload,
            qos: p.qos.min(1),
            retain: false,
            share: None,
        };
        if p.retain {
            if base.payload.is_empty() {
                st.retained.remove(&p.topic);
            } else if st.retained.len() < self.limits.max_retained
                || st.retained.contains_key(&p.topic)
            {
                st.retained.insert(p.topic.clone(), base.clone());
            } else {
                self.metrics.dropped("retained_full");
            }
        }
        let mut direct: HashMap<String, u8> = HashMap::new();
        let mut shared: Vec<Arc<(String, String)>> = Vec::new();
        for (filter, entry) in &st.filters {
            if !matches(filter, &base.topic) {
                continue;
            }
            for (c, q) in &entry.direct {
                let e = direct.entry(c.clone()).or_insert(0);
                *e = (*e).max(*q);
            }
            for g in entry.groups.keys() {
                shared.push(Arc::new((g.clone(), filter.clone())));
            }
        }
        for (c, q) in direct {
            let mut m = base.clone();
            m.qos = m.qos.min(q);
            self.enqueue(st, &c, m);
        }
        for share in shared {
            let mut m = base.clone();
            m.share = Some(share.clone());
            self.deliver_shared(st, &share, m);
        }
    }

    /// Gives `msg` to one member of the group: the next connected one with room,
    /// else the next (offline, persistent) one with room.
    fn deliver_shared(&self, st: &mut State, share: &Arc<(String, String)>, mut msg: Message) {
        let State {
            filters, sessions, ..
        } = st;
        let Some(group) = filters
            .get_mut(&share.1)
            .and_then(|e| e.groups.get_mut(&share.0))
        else {
            self.metrics.dropped("no_subscriber");
            return;
        };
        let n = group.members.len();
        let mut pick = None;
        for connected in [true, false] {
            pick = (0..n).map(|i| (group.next + i) % n).find(|&i| {
                sessions.get(&group.members[i].0).is_some_and(|s| {
                    s.owner.is_some() == connected && s.has_room(&self.limits, &msg)
                })
            });
            if pick.is_some() {
                break;
            }
        }
        let Some(i) = pick else {
            self.metrics.dropped("queue_full");
            return;
        };
        group.next = (i + 1) % n;
        let (client, q) = group.members[i].clone();
        msg.qos = msg.qos.min(q);
        self.enqueue(st, &client, msg);
    }

    fn enqueue(&self, st: &mut State, client: &str, msg: Message) {
        let Some(s) = st.sessions.get_mut(client) else {
            return;
        };
        if msg.qos == 0 && s.owner.is_none() {
            return; // QoS 0 is not kept for offline sessions
        }
        if !s.has_room(&self.limits, &msg) {
            self.metrics.dropped("queue_full");
            let now = Instant::now();
            if s.last_drop_warning
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
            {
                s.last_drop_warning = Some(now);
                tracing::warn!(
                    client,
                    held = s.held(),
                    held_bytes = s.held_bytes,
                    "MQTT session full (platform.broker.max_queued / max_queued_bytes): dropping messages for it; is its subscriber gone or too slow?"
                );
            }
            return;
        }
        s.held_bytes += msg.size();
        s.queue.push_back(msg);
        s.wake.notify_one();
    }

    /// Subscribes `client` (owned by `conn`); the granted QoS per filter, `None` for a
    /// refused one. Retained messages matching a plain filter are queued for it.
    pub fn subscribe(&self, client: &str, filters: &[(String, u8)]) -> Vec<Option<u8>> {
        let mut st = self.state.lock();
        let mut granted = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        for (text, qos) in filters {
            let Some(sub) = Subscription::parse(text) else {
                granted.push(None);
                continue;
            };
            let q = (*qos).min(1);
            let Some(s) = st.sessions.get_mut(client) else {
                granted.push(None);
                continue;
            };
            if let Some((old, _)) = s.subs.insert(text.clone(), (sub.clone(), q)) {
                unindex(&mut st.filters, client, &old);
            }
            let entry = st.filters.entry(sub.filter.clone()).or_default();
            match &sub.group {
                Some(g) => entry
                    .groups
                    .entry(g.clone())
                    .or_default()
                    .members
                    .push((client.to_string(), q)),
                None => {
                    entry.direct.insert(client.to_string(), q);
                    for m in st.retained.values() {
                        if matches(&sub.filter, &m.topic) {
                            let mut m = m.clone();
                            m.retain = true;
                            m.qos = m.qos.min(q);
                            retained.push(m);
                        }
                    }
                }
            }
            tracing::debug!(client, filter = %text, qos = q, "subscribed");
            granted.push(Some(q));
        }
        for m in retained {
            self.enqueue(&mut st, client, m);
        }
        granted
    }

    /// Removes subscriptions; how many were named. Messages a shared subscription
    /// queued for this client and not yet sent go to the rest of its group (a worker
    /// leaving its group on a scale-down keeps only what it already received).
    pub fn unsubscribe(&self, client: &str, filters: &[String]) -> usize {
        let mut st = self.state.lock();
        for f in filters {
            let Some(s) = st.sessions.get_mut(client) else {
                break;
            };
            let Some((sub, _)) = s.subs.remove(f) else {
                continue;
            };
            let mut handed = Vec::new();
            if let Some(group) = &sub.group {
                let (keep, give): (VecDeque<Message>, VecDeque<Message>) =
                    s.queue.drain(..).partition(|m| {
                        m.share
                            .as_ref()
                            .is_none_or(|x| x.0 != *group || x.1 != sub.filter)
                    });
                s.queue = keep;
                for m in &give {
                    s.held_bytes -= m.size().min(s.held_bytes);
                }
                handed.extend(give);
            }
            unindex(&mut st.filters, client, &sub);
            for m in handed {
                if let Some(share) = m.share.clone() {
                    self.deliver_shared(&mut st, &share, m);
                }
            }
        }
        filters.len()
    }

    /// A PUBACK from `client`: the message is delivered.
    pub fn acked(&self, client: &str, pkid: u16) {
        let mut st = self.state.lock();
        if let Some(s) = st.sessions.get_mut(client)
            && let Some(m) = s.inflight.remove(&pkid)
        {
            s.held_bytes -= m.size().min(s.held_bytes);
            s.wake.notify_one();
            self.metrics.delivered.inc();
        }
    }

    /// A QoS 2 PUBLISH: `true` the first time its packet id is seen (route it).
    pub fn qos2_received(&self, client: &str, pkid: u16) -> bool {
        let mut st = self.state.lock();
        st.sessions
            .get_mut(client)
            .is_some_and(|s| s.qos2.insert(pkid))
    }

    /// A PUBREL: the QoS 2 exchange ends.
    pub fn qos2_released(&self, client: &str, pkid: u16) {
        let mut st = self.state.lock();
        if let Some(s) = st.sessions.get_mut(client) {
            s.qos2.remove(&pkid);
        }
    }

    /// Moves what `client` may receive now into `out` (at most `budget` bytes):
    /// first, after a reconnect, the unacknowledged messages again, then queued ones
    /// while the in-flight window has room. `None` when `conn` no longer owns the
    /// session (taken over).
    pub fn fill(
        &self,
        client: &str,
        conn: u64,
        out: &mut Vec<Publish>,
        budget: usize,
    ) -> Option<()> {
        let mut st = self.state.lock();
        let s = st.sessions.get_mut(client)?;
        if s.owner != Some(conn) {
            return None;
        }
        let mut bytes = 0usize;
        if s.resend {
            s.resend = false;
            for (id, m) in &s.inflight {
                bytes += m.payload.len();
                out.push(to_publish(m, *id, true));
            }
            self.metrics.redelivered.inc_by(s.inflight.len() as u64);
        }
        let mut dropped = 0u64;
        while bytes < budget && s.inflight.len() < s.receive_max {
            let Some(m) = s.queue.pop_front() else { break };
            if m.size() + 16 > u64::from(s.max_packet) {
                s.held_bytes -= m.size().min(s.held_bytes);
                dropped += 1;
                continue;
            }
            bytes += m.payload.len();
            if m.qos == 0 {
                s.held_bytes -= m.size().min(s.held_bytes);
                out.push(to_publish(&m, 0, false));
                self.metrics.delivered.inc();
            } else {
                let id = s.next_pkid();
                out.push(to_publish(&m, id, false));
                s.inflight.insert(id, m);
            }
        }
        self.metrics.dropped_n("too_large_for_client", dropped);
        Some(())
    }
}

fn to_publish(m: &Message, pkid: u16, dup: bool) -> Publish {
    Publish {
        topic: m.topic.to_string(),
        payload: m.payload.clone(),
        qos: m.qos,
        retain: m.retain,
        dup: dup && m.qos > 0,
        pkid,
    }
}

fn unindex(filters: &mut HashMap<String, Entry>, client: &str, sub: &Subscription) {
    let Some(entry) = filters.get_mut(&sub.filter) else {
        return;
    };
    match &sub.group {
        Some(g) => {
            if let Some(group) = entry.groups.get_mut(g) {
                group.members.retain(|(c, _)| c != client);
                if group.members.is_empty() {
                    entry.groups.remove(g);
                } else {
                    group.next %= group.members.len();
                }
            }
        }
        None => {
            entry.direct.remove(client);
        }
    }
    if entry.is_empty() {
        filters.remove(&sub.filter);
    }
}

#[cfg(test)]
mod tests;
