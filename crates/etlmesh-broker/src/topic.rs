//! Topic names and filters: validation, matching (`+` one level, `#` the rest; topics
//! starting with `$` are not matched by a wildcard in the first level), and shared
//! subscriptions (`$share/GROUP/FILTER`).

/// A topic name a client may publish to: not empty, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A filter a client may subscribe to: `#` only as a whole last level, `+` only as a
/// whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether `topic` matches `filter` (both valid).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(l)) if f == l => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// A subscription as a client wrote it: a plain filter, or a filter shared by a group
/// (each message goes to one member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The filter messages are matched against.
    pub filter: String,
    /// The group, for `$share/GROUP/FILTER`.
    pub group: Option<String>,
}

impl Subscription {
    /// Parses what a SUBSCRIBE names; `None` when it is not a valid filter.
    pub fn parse(text: &str) -> Option<Self> {
        if let Some(rest) = text.strip_prefix("$share/") {
            let (group, filter) = rest.split_once('/')?;
            if group.is_empty() || group.contains(['+', '#']) || !valid_filter(filter) {
                return None;
            }
            return Some(Self {
                filter: filter.to_string(),
                group: Some(group.to_string()),
            });
        }
        valid_filter(text).then(|| Self {
            filter: text.to_string(),
            group: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_levels() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("+/+", "/x"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn filters_and_topics_are_checked() {
        assert!(valid_filter("a/+/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+"));
        assert!(!valid_filter(""));
        assert!(!valid_topic("a/+"));
        assert!(!valid_topic("a\0b"));
        assert!(valid_topic("a/b"));
    }

    #[test]
    fn shared_subscriptions_name_their_group() {
        let s = Subscription::parse("$share/g1/x/+/y").expect("valid");
        assert_eq!(s.group.as_deref(), Some("g1"));
        assert_eq!(s.filter, "x/+/y");
        assert!(Subscription::parse("$share/g1").is_none());
        assert!(Subscription::parse("$share//x").is_none());
        assert_eq!(Subscription::parse("x/#").map(|s| s.group), Some(None));
    }
}
