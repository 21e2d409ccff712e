//! The in-memory object store: one ordered map per resource, one global resourceVersion counter,
//! and a bounded history of watch events (the equivalent of etcd's revisions before compaction).
//!
//! Every write assigns the next resourceVersion, records the event in the history and publishes
//! it on a broadcast channel, all under the caller's lock, so a watcher that subscribes under the
//! same lock sees every later event exactly once and in order.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::meta;
use super::resources::{ResourceId, RESOURCES};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change. `previous` is the object before a modification (for selector transitions).
#[derive(Debug)]
pub struct WatchEvent {
    pub rv: u64,
    pub resource: ResourceId,
    pub kind: EventType,
    pub object: Arc<Value>,
    pub previous: Option<Arc<Value>>,
}

/// `(namespace, name)`; namespace is empty for cluster-scoped objects.
pub type ObjectKey = (String, String);

pub struct Store {
    rv: u64,
    objects: Vec<BTreeMap<ObjectKey, Arc<Value>>>,
    history: VecDeque<Arc<WatchEvent>>,
    history_limit: usize,
    /// Every event with a resourceVersion above this one is still in `history`.
    compacted_rv: u64,
    tx: broadcast::Sender<Arc<WatchEvent>>,
}

/// Live events buffered per watcher before it is considered too slow and cut off.
const WATCH_CHANNEL_CAPACITY: usize = 4096;

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(WATCH_CHANNEL_CAPACITY);
        Store {
            rv: 0,
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted_rv: 0,
            tx,
        }
    }

    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    pub fn compacted_rv(&self) -> u64 {
        self.compacted_rv
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.tx.subscribe()
    }

    pub fn get(&self, res: ResourceId, ns: &str, name: &str) -> Option<&Arc<Value>> {
        self.objects[res].get(&(ns.to_string(), name.to_string()))
    }

    /// Objects of a resource in key order, optionally within one namespace.
    pub fn iter<'a>(
        &'a self,
        res: ResourceId,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a Arc<Value>)> + 'a {
        let map = &self.objects[res];
        let range: Box<dyn Iterator<Item = (&ObjectKey, &Arc<Value>)>> = match ns {
            Some(ns) => Box::new(
                map.range((ns.to_string(), String::new())..)
                    .take_while(move |((n, _), _)| n == ns),
            ),
            None => Box::new(map.iter()),
        };
        range
    }

    /// Objects after `after` (exclusive) in key order, for paging.
    pub fn iter_from<'a>(
        &'a self,
        res: ResourceId,
        after: &ObjectKey,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a Arc<Value>)> + 'a {
        use std::ops::Bound;
        self.objects[res].range((Bound::Excluded(after.clone()), Bound::Unbounded))
    }

    pub fn count_in_namespace(&self, ns: &str) -> usize {
        RESOURCES
            .iter()
            .enumerate()
            .filter(|(_, d)| d.namespaced)
            .map(|(i, _)| self.iter(i, Some(ns)).count())
            .sum()
    }

    /// Events of `res` after `rv`, oldest first; None if some of them were compacted away.
    pub fn history_since(&self, rv: u64) -> Option<Vec<Arc<WatchEvent>>> {
        if rv < self.compacted_rv {
            return None;
        }
        let start = self.history.partition_point(|e| e.rv <= rv);
        Some(self.history.range(start..).cloned().collect())
    }

    fn record(&mut self, event: WatchEvent) {
        let event = Arc::new(event);
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(event);
    }

    fn stamp(&mut self, obj: &mut Value) -> u64 {
        self.rv += 1;
        meta::set_meta(obj, "resourceVersion", json!(self.rv.to_string()));
        self.rv
    }

    /// Inserts or replaces an object, assigning it the next resourceVersion.
    pub fn put(&mut self, res: ResourceId, mut obj: Value) -> Arc<Value> {
        let key = (
            meta::namespace(&obj).to_string(),
            meta::name(&obj).to_string(),
        );
        let rv = self.stamp(&mut obj);
        let obj = Arc::new(obj);
        let previous = self.objects[res].insert(key, obj.clone());
        let kind = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(WatchEvent {
            rv,
            resource: res,
            kind,
            object: obj.clone(),
            previous,
        });
        obj
    }

    /// Removes an object; the DELETED event (and the returned object) carry the deletion's
    /// resourceVersion, as the real server reports it.
    pub fn remove(&mut self, res: ResourceId, ns: &str, name: &str) -> Option<Arc<Value>> {
        let old = self.objects[res].remove(&(ns.to_string(), name.to_string()))?;
        let mut obj = (*old).clone();
        let rv = self.stamp(&mut obj);
        let obj = Arc::new(obj);
        self.record(WatchEvent {
            rv,
            resource: res,
            kind: EventType::Deleted,
            object: obj.clone(),
            previous: Some(old),
        });
        Some(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(ns: &str, name: &str) -> Value {
        json!({ "metadata": { "namespace": ns, "name": name } })
    }

    #[test]
    fn writes_bump_one_global_counter() {
        let mut s = Store::new(10);
        let a = s.put(3, cm("a", "x"));
        let b = s.put(4, cm("a", "y"));
        assert_eq!(meta::resource_version(&a), "1");
        assert_eq!(meta::resource_version(&b), "2");
        let gone = s.remove(3, "a", "x").unwrap();
        assert_eq!(meta::resource_version(&gone), "3");
        assert!(s.get(3, "a", "x").is_none());
        let h = s.history_since(1).unwrap();
        assert_eq!(
            h.iter().map(|e| e.kind).collect::<Vec<_>>(),
            vec![EventType::Added, EventType::Deleted]
        );
    }

    #[test]
    fn namespace_iteration_stays_in_its_namespace() {
        let mut s = Store::new(10);
        for (ns, n) in [("a", "1"), ("ab", "2"), ("b", "3"), ("a", "4")] {
            s.put(3, cm(ns, n));
        }
        let names: Vec<_> = s.iter(3, Some("a")).map(|(k, _)| k.1.clone()).collect();
        assert_eq!(names, vec!["1", "4"]);
        assert_eq!(s.iter(3, None).count(), 4);
        assert_eq!(s.count_in_namespace("ab"), 1);
        let after: Vec<_> = s
            .iter_from(3, &("a".into(), "4".into()))
            .map(|(k, _)| k.1.clone())
            .collect();
        assert_eq!(after, vec!["2", "3"]);
    }

    #[test]
    fn history_is_bounded_and_reports_compaction() {
        let mut s = Store::new(2);
        for i in 0..5 {
            s.put(3, cm("a", &i.to_string()));
        }
        assert_eq!(s.compacted_rv(), 3);
        assert!(s.history_since(2).is_none());
        assert_eq!(s.history_since(3).unwrap().len(), 2);
        assert_eq!(s.history_since(5).unwrap().len(), 0);
    }
}
