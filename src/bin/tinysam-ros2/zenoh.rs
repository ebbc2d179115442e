//! The Zenoh side of the bridge, for ROS 2 systems on `rmw_zenoh`: a Zenoh session laid out as
//! rmw_zenoh lays out a node ([`tinysam_edge::ros2::rmw_zenoh`]: keys with the real type hashes,
//! liveliness tokens for the graph, attachments, CDR payloads), the two publishers, the two prompt
//! subscriptions and the loop that hands arriving prompts to the bridge.
//!
//! The session's configuration is rmw_zenoh's: the JSON5 file `$ZENOH_SESSION_CONFIG_URI` names,
//! else a peer that connects to the router (`ros2.zenoh_router`, rmw_zenohd's
//! `tcp/127.0.0.1:7447` by default), listens on loopback only and does no multicast scouting;
//! then `$ZENOH_CONFIG_OVERRIDE` (`key=value;…`) on top. Without a router the node starts and
//! waits for one.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tinysam_edge::config::Ros2Settings;
use tinysam_edge::ros2::convert;
use tinysam_edge::ros2::messages::{
    CompressedImage, Detection2DArray, Image, PointStamped, RosMessage,
};
use tinysam_edge::ros2::rmw_zenoh::{self, EntityKind, NodeIds, Qos};
use tinysam_edge::ros2::Bridge;

use crate::{Publishers, TopicPublisher};
use zenoh::handlers::FifoChannelHandler;
use zenoh::liveliness::LivelinessToken;
use zenoh::pubsub::Subscriber;
use zenoh::sample::Sample;
use zenoh::{Config, Session, Wait};

/// One publisher: its key, GID, sequence counter and discovery token.
struct Publisher<M> {
    inner: zenoh::pubsub::Publisher<'static>,
    gid: [u8; 16],
    sequence: AtomicI64,
    _token: LivelinessToken,
    _message: std::marker::PhantomData<fn(M)>,
}

impl<M: RosMessage + Serialize> Publisher<M> {
    fn declare(
        session: &Session,
        ids: &NodeIds,
        entity: u64,
        topic: &str,
        qos: Qos,
    ) -> anyhow::Result<Self> {
        let token_key = ids.entity_token::<M>(entity, EntityKind::Publisher, topic, qos);
        let inner = session
            .declare_publisher(ids.topic_key::<M>(topic))
            .wait()
            .map_err(|e| anyhow::anyhow!("publisher {topic}: {e}"))?;
        let token = session
            .liveliness()
            .declare_token(token_key.clone())
            .wait()
            .map_err(|e| anyhow::anyhow!("liveliness token of {topic}: {e}"))?;
        Ok(Publisher {
            inner,
            gid: rmw_zenoh::gid(&token_key),
            sequence: AtomicI64::new(0),
            _token: token,
            _message: std::marker::PhantomData,
        })
    }

    fn publish(&self, message: &M) -> Result<(), String> {
        let payload = rmw_zenoh::to_payload(message).map_err(|e| e.to_string())?;
        let sequence = self
            .sequence
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let now = i64::try_from(convert::realtime_now_ns()).unwrap_or(i64::MAX);
        self.inner
            .put(payload)
            .attachment(rmw_zenoh::attachment(sequence, now, &self.gid))
            .wait()
            .map_err(|e| e.to_string())
    }
}

impl<M: RosMessage + Serialize> TopicPublisher<M> for Publisher<M> {
    fn send(&self, message: M) -> Result<(), String> {
        self.publish(&message)
    }
}

/// One prompt subscription and its discovery token.
struct Subscription<M> {
    inner: Subscriber<FifoChannelHandler<Sample>>,
    _token: LivelinessToken,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M: RosMessage + DeserializeOwned> Subscription<M> {
    fn declare(session: &Session, ids: &NodeIds, entity: u64, topic: &str) -> anyhow::Result<Self> {
        let inner = session
            .declare_subscriber(ids.subscription_key::<M>(topic))
            .wait()
            .map_err(|e| anyhow::anyhow!("subscription {topic}: {e}"))?;
        let token = session
            .liveliness()
            .declare_token(ids.entity_token::<M>(
                entity,
                EntityKind::Subscription,
                topic,
                Qos::Reliable,
            ))
            .wait()
            .map_err(|e| anyhow::anyhow!("liveliness token of {topic}: {e}"))?;
        Ok(Subscription {
            inner,
            _token: token,
            _message: std::marker::PhantomData,
        })
    }

    /// Take every waiting message to `handle`; unreadable ones are counted.
    fn drain(&self, topic: &str, bridge: &Bridge, handle: impl Fn(&M)) {
        while let Ok(Some(sample)) = self.inner.try_recv() {
            match rmw_zenoh::from_payload::<M>(&sample.payload().to_bytes()) {
                Ok(message) => handle(&message),
                Err(e) => bridge.reject_unreadable(topic, &e.to_string()),
            }
        }
    }
}

/// The session configuration, as rmw_zenoh makes it (see the module docs).
fn session_config(router: &str) -> anyhow::Result<Config> {
    let mut config = match std::env::var("ZENOH_SESSION_CONFIG_URI") {
        Ok(path) if !path.trim().is_empty() => Config::from_file(path.trim())
            .map_err(|e| anyhow::anyhow!("ZENOH_SESSION_CONFIG_URI={path:?}: {e}"))?,
        _ => {
            let mut config = Config::default();
            let router = serde_json::to_string(&[router]).context("ros2.zenoh_router")?;
            for (key, value) in [
                ("mode", "\"peer\""),
                ("connect/endpoints", router.as_str()),
                ("listen/endpoints", "[\"tcp/127.0.0.1:0\"]"),
                ("scouting/multicast/enabled", "false"),
            ] {
                config
                    .insert_json5(key, value)
                    .map_err(|e| anyhow::anyhow!("Zenoh config {key} = {value}: {e}"))?;
            }
            config
        }
    };
    if let Ok(overrides) = std::env::var("ZENOH_CONFIG_OVERRIDE") {
        for entry in overrides
            .split(';')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (key, value) = entry
                .split_once('=')
                .with_context(|| format!("ZENOH_CONFIG_OVERRIDE: {entry:?} is not key=value"))?;
            config
                .insert_json5(key.trim(), value.trim())
                .map_err(|e| anyhow::anyhow!("ZENOH_CONFIG_OVERRIDE {entry:?}: {e}"))?;
        }
    }
    Ok(config)
}

/// Run the node until `stop` is set: the bridge on its own thread, prompts polled on this one.
pub fn run(settings: &Ros2Settings, bridge: &Arc<Bridge>, stop: &AtomicBool) -> anyhow::Result<()> {
    let config = session_config(&settings.zenoh_router)?;
    let session = zenoh::open(config)
        .wait()
        .map_err(|e| anyhow::anyhow!("opening the Zenoh session: {e}"))?;
    let ids = NodeIds {
        domain: settings.domain_id,
        session: session.zid().to_string(),
        node_id: 0,
        namespace: settings.namespace.clone(),
        name: settings.node_name.clone(),
    };
    let _node_token = session
        .liveliness()
        .declare_token(ids.node_token())
        .wait()
        .map_err(|e| anyhow::anyhow!("the node's liveliness token: {e}"))?;
    let private = settings.private_namespace();
    let topic = |name: &str| format!("{private}/{name}");
    let publishers = Publishers {
        masks: Publisher::<Image>::declare(&session, &ids, 1, &topic("masks"), Qos::SensorData)?,
        detections: Publisher::<Detection2DArray>::declare(
            &session,
            &ids,
            2,
            &topic("detections"),
            Qos::Reliable,
        )?,
        overlay: match settings.publish_overlay {
            true => Some(Publisher::<CompressedImage>::declare(
                &session,
                &ids,
                5,
                &topic(crate::OVERLAY_TOPIC),
                Qos::SensorData,
            )?),
            false => None,
        },
    };
    let prompts = Subscription::<Detection2DArray>::declare(&session, &ids, 3, &topic("prompts"))?;
    let points = Subscription::<PointStamped>::declare(&session, &ids, 4, &topic("points"))?;
    log::info!(
        "node {private} on Zenoh (domain {}, session {}): publishing {}; prompts on \
         {private}/prompts, {private}/points",
        settings.domain_id,
        ids.session,
        crate::published_topics(settings)
    );
    crate::serve(bridge, stop, &publishers, || {
        prompts.drain("~/prompts", bridge, |m| bridge.submit_detections(m));
        points.drain("~/points", bridge, |m| bridge.submit_point(m));
    })?;
    drop((publishers, prompts, points));
    session
        .close()
        .wait()
        .map_err(|e| anyhow::anyhow!("closing the Zenoh session: {e}"))
}
