//! Watch streams: newline-delimited JSON `{"type": …, "object": …}` events over a chunked body.
//!
//! The start point and the subscription to live events are taken under one store lock, so the
//! replayed events (history after the requested resourceVersion, or synthetic ADDED events of
//! the current state) and the live ones neither overlap nor leave a gap.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use super::crud::{matches, parse_rv};
use super::errors::{ApiError, Cause};
use super::resources::{def, ResourceDef, ResourceId};
use super::selectors::{FieldSelector, LabelSelector};
use super::state::ApiState;
use super::store::{EventType, WatchEvent};
use super::tables::{self, IncludeObject};

/// How objects are rendered in responses (content negotiation of `Accept`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Json,
    Table(IncludeObject),
    Metadata,
}

#[derive(Clone, Debug)]
pub struct WatchRequest {
    pub res: ResourceId,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub send_initial_events: Option<bool>,
    pub allow_bookmarks: bool,
    pub timeout: Option<Duration>,
    pub output: Output,
}

/// Renders objects and selector transitions for one watch.
struct Renderer {
    def: &'static ResourceDef,
    req: WatchRequest,
}

impl Renderer {
    fn matches(&self, obj: &Value) -> bool {
        matches(
            self.req.namespace.as_deref(),
            &self.req.labels,
            &self.req.fields,
            obj,
        )
    }

    fn frame(&self, kind: &str, obj: &Value) -> Bytes {
        let object = match self.req.output {
            Output::Json => obj.clone(),
            Output::Metadata => tables::partial_metadata(obj),
            Output::Table(include) => tables::to_table(
                self.def,
                [obj],
                include,
                json!({ "resourceVersion": super::meta::resource_version(obj) }),
            ),
        };
        let mut line = json!({ "type": kind, "object": object }).to_string();
        line.push('\n');
        Bytes::from(line)
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut md = json!({ "resourceVersion": rv.to_string() });
        if initial_events_end {
            md["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let mut line = json!({
            "type": "BOOKMARK",
            "object": { "kind": self.def.kind, "apiVersion": self.def.api_version(), "metadata": md },
        })
        .to_string();
        line.push('\n');
        Bytes::from(line)
    }

    /// The event this watcher sees for a store event, applying selector transitions the way the
    /// real watch cache does: entering the selection is ADDED, leaving it is DELETED.
    fn render(&self, ev: &WatchEvent) -> Option<Bytes> {
        if ev.resource != self.req.res {
            return None;
        }
        match ev.kind {
            EventType::Added => self
                .matches(&ev.object)
                .then(|| self.frame("ADDED", &ev.object)),
            EventType::Deleted => {
                let before = ev.previous.as_deref().unwrap_or(&ev.object);
                self.matches(before)
                    .then(|| self.frame("DELETED", &ev.object))
            }
            EventType::Modified => {
                let now = self.matches(&ev.object);
                let before = ev.previous.as_deref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some(self.frame("MODIFIED", &ev.object)),
                    (false, true) => Some(self.frame("ADDED", &ev.object)),
                    (true, false) => {
                        // The old state, at the new resourceVersion.
                        let mut old = ev.previous.as_deref().cloned().unwrap_or_default();
                        super::meta::set_meta(
                            &mut old,
                            "resourceVersion",
                            json!(ev.rv.to_string()),
                        );
                        Some(self.frame("DELETED", &old))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

fn error_frame(err: &ApiError) -> Bytes {
    let mut line = json!({ "type": "ERROR", "object": err.to_status() }).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// Validates the request, captures the starting point, and returns the streaming body.
pub fn start(state: &Arc<ApiState>, req: WatchRequest) -> Result<Body, ApiError> {
    let d = def(req.res);
    let send_initial = req.send_initial_events == Some(true);
    if req.send_initial_events.is_some()
        && req.resource_version_match.as_deref() != Some("NotOlderThan")
    {
        return Err(ApiError::invalid(
            "meta.k8s.io",
            "ListOptions",
            "",
            vec![Cause::forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            )],
        ));
    }
    if send_initial && !req.allow_bookmarks {
        return Err(ApiError::invalid(
            "meta.k8s.io",
            "ListOptions",
            "",
            vec![Cause::forbidden(
                "allowWatchBookmarks",
                "sendInitialEvents requires setting allowWatchBookmarks to true",
            )],
        ));
    }
    let requested_rv = match req.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(parse_rv(rv)?),
    };
    let renderer = Renderer { def: d, req };

    let mut initial = Vec::new();
    let (events, start_rv) = {
        let store = state.lock_store();
        let rx = store.subscribe();
        let start_rv = store.current_rv();
        match requested_rv {
            Some(rv) if !send_initial => match store.history_since(rv) {
                Some(history) => {
                    initial.extend(history.iter().filter_map(|ev| renderer.render(ev)));
                }
                None => {
                    let err = ApiError::expired(format!(
                        "too old resource version: {rv} ({})",
                        store.compacted_rv() + 1
                    ));
                    initial.push(error_frame(&err));
                    return Ok(Body::from_stream(futures::stream::iter(
                        initial.into_iter().map(Ok::<_, std::convert::Infallible>),
                    )));
                }
            },
            _ => {
                let ns = renderer.req.namespace.as_deref();
                for (_, obj) in store.iter(renderer.req.res, ns) {
                    if renderer.matches(obj) {
                        initial.push(renderer.frame("ADDED", obj));
                    }
                }
                if send_initial {
                    initial.push(renderer.bookmark(start_rv, true));
                }
            }
        }
        (rx, start_rv)
    };

    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let shutdown = state.shutdown_signal();
    let bookmark_interval = state.bookmark_interval();
    tokio::spawn(pump(
        tx,
        initial,
        events,
        renderer,
        start_rv,
        bookmark_interval,
        shutdown,
    ));
    let stream =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    Ok(Body::from_stream(stream))
}

/// Outcome of handling one broadcast receive.
enum Step {
    Continue,
    Stop,
}

async fn forward(
    tx: &mpsc::Sender<Bytes>,
    renderer: &Renderer,
    received: Result<Arc<WatchEvent>, broadcast::error::RecvError>,
    progress: &mut u64,
) -> Step {
    match received {
        Ok(ev) => {
            *progress = ev.rv;
            match renderer.render(&ev) {
                Some(frame) => {
                    if tx.send(frame).await.is_err() {
                        Step::Stop
                    } else {
                        Step::Continue
                    }
                }
                None => Step::Continue,
            }
        }
        Err(broadcast::error::RecvError::Lagged(_)) => {
            // Too slow to keep up: end with 410 so the client relists, as the real server
            // does when a watcher falls behind the cache.
            let err = ApiError::expired("watch fell behind; resourceVersion too old, relist");
            let _ = tx.send(error_frame(&err)).await;
            Step::Stop
        }
        Err(broadcast::error::RecvError::Closed) => Step::Stop,
    }
}

async fn pump(
    tx: mpsc::Sender<Bytes>,
    initial: Vec<Bytes>,
    mut events: broadcast::Receiver<Arc<WatchEvent>>,
    renderer: Renderer,
    start_rv: u64,
    bookmark_interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    for frame in initial {
        if tx.send(frame).await.is_err() {
            return;
        }
    }
    let mut progress = start_rv;
    let deadline = renderer
        .req
        .timeout
        .map(|t| tokio::time::Instant::now() + t);
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + bookmark_interval,
        bookmark_interval,
    );
    let bookmarks = renderer.req.allow_bookmarks;
    loop {
        tokio::select! {
            received = events.recv() => {
                if let Step::Stop = forward(&tx, &renderer, received, &mut progress).await {
                    return;
                }
            }
            _ = ticker.tick(), if bookmarks => {
                // Everything published so far must be sent before a bookmark claims it.
                loop {
                    let received = match events.try_recv() {
                        Err(broadcast::error::TryRecvError::Empty) => break,
                        Ok(ev) => Ok(ev),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
                        Err(broadcast::error::TryRecvError::Closed) => Err(broadcast::error::RecvError::Closed),
                    };
                    if let Step::Stop = forward(&tx, &renderer, received, &mut progress).await {
                        return;
                    }
                }
                if tx.send(renderer.bookmark(progress, false)).await.is_err() {
                    return;
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => return,
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
        }
    }
}
