//! The DDS side of the bridge (RustDDS through `ros2-client`): the node, its two publishers and
//! two prompt subscriptions, the node's spinner (graph and discovery bookkeeping, so that
//! `ros2 node list` shows it), and the loop that hands arriving prompts to the bridge.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context as _;
use ros2_client::dds::{Context, ContextOptions, Publisher, Subscription};
use ros2_client::qos::{History, QosProfile, WhenFull};
use ros2_client::{MessageTypeName, Name, NodeName, NodeOptions};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tinysam_edge::config::Ros2Settings;
use tinysam_edge::ros2::messages::{
    CompressedImage, Detection2DArray, Image, PointStamped, RosMessage,
};
use tinysam_edge::ros2::Bridge;

use crate::{Publishers, TopicPublisher};

/// The sensor-data profile for images: best effort, only the newest kept.
const IMAGE_QOS: QosProfile = QosProfile::subscription_default();
/// Detections and prompts: reliable, the last 10 kept (ROS 2's default profile).
const RELIABLE_QOS: QosProfile = QosProfile::publisher_default()
    .reliability_reliable(WhenFull::DEFAULT)
    .history(History::KeepLast { depth: 10 });

impl<M: Serialize> TopicPublisher<M> for Publisher<M> {
    fn send(&self, message: M) -> Result<(), String> {
        // Display, not Debug: a write error's Debug form carries the whole message (an image).
        self.publish(message).map_err(|e| e.to_string())
    }
}

fn type_name<M: RosMessage>() -> MessageTypeName {
    MessageTypeName::new(M::PACKAGE, M::TYPE)
}

/// Take every waiting message of `subscription` to `handle`; unreadable ones are counted.
fn drain<M: DeserializeOwned + 'static>(
    subscription: &Subscription<M>,
    topic: &str,
    bridge: &Bridge,
    handle: impl Fn(&M),
) {
    loop {
        match subscription.take() {
            Ok(Some((message, _info))) => handle(&message),
            Ok(None) => return,
            // The reader moves past a sample it could not read.
            Err(e) => bridge.reject_unreadable(topic, &format!("{e:?}")),
        }
    }
}

/// Run the node until `stop` is set: the bridge on its own thread, prompts polled on this one.
pub fn run(settings: &Ros2Settings, bridge: &Arc<Bridge>, stop: &AtomicBool) -> anyhow::Result<()> {
    let context = Context::with_options(ContextOptions::new().domain_id(settings.domain_id))
        .map_err(|e| anyhow::anyhow!("starting DDS on domain {}: {e:?}", settings.domain_id))?;
    let node_name = NodeName::new(&settings.namespace, &settings.node_name)
        .map_err(|e| anyhow::anyhow!("node name: {e:?}"))?;
    let mut node = context
        .new_node(node_name, NodeOptions::new().enable_rosout(true))
        .map_err(|e| anyhow::anyhow!("creating the node: {e:?}"))?;
    // Topics in the node's private namespace (`~/masks`): `<namespace>/<node>/masks`.
    let private = settings.private_namespace();
    let topic = |name: &str, type_name: MessageTypeName, qos: &QosProfile| {
        let (namespace, base) = match name.rsplit_once('/') {
            Some((dir, base)) => (format!("{private}/{dir}"), base),
            None => (private.clone(), name),
        };
        let full =
            Name::new(&namespace, base).map_err(|e| anyhow::anyhow!("topic {name}: {e:?}"))?;
        node.create_topic(&full, type_name, qos)
            .map_err(|e| anyhow::anyhow!("topic {private}/{name}: {e:?}"))
    };
    let masks_topic = topic("masks", type_name::<Image>(), &IMAGE_QOS)?;
    let detections_topic = topic("detections", type_name::<Detection2DArray>(), &RELIABLE_QOS)?;
    let prompts_topic = topic("prompts", type_name::<Detection2DArray>(), &RELIABLE_QOS)?;
    let points_topic = topic("points", type_name::<PointStamped>(), &RELIABLE_QOS)?;
    let overlay_topic = settings
        .publish_overlay
        .then(|| {
            topic(
                crate::OVERLAY_TOPIC,
                type_name::<CompressedImage>(),
                &IMAGE_QOS,
            )
        })
        .transpose()?;
    let publishers = Publishers {
        masks: node
            .create_publisher(&masks_topic, None)
            .map_err(|e| anyhow::anyhow!("publisher ~/masks: {e:?}"))?,
        detections: node
            .create_publisher(&detections_topic, None)
            .map_err(|e| anyhow::anyhow!("publisher ~/detections: {e:?}"))?,
        overlay: match overlay_topic {
            Some(topic) => Some(
                node.create_publisher(&topic, None)
                    .map_err(|e| anyhow::anyhow!("publisher ~/overlay: {e:?}"))?,
            ),
            None => None,
        },
    };
    let prompts: Subscription<Detection2DArray> = node
        .create_subscription(&prompts_topic, None)
        .map_err(|e| anyhow::anyhow!("subscription ~/prompts: {e:?}"))?;
    let points: Subscription<PointStamped> = node
        .create_subscription(&points_topic, None)
        .map_err(|e| anyhow::anyhow!("subscription ~/points: {e:?}"))?;
    let spinner = node
        .spinner()
        .map_err(|e| anyhow::anyhow!("node spinner: {e:?}"))?;
    std::thread::Builder::new()
        .name("ros2-spinner".into())
        .spawn(move || {
            if let Err(e) = futures::executor::block_on(spinner.spin()) {
                log::warn!("ROS 2 node spinner stopped: {e:?}");
            }
        })
        .context("starting the spinner thread")?;
    log::info!(
        "node {} on DDS domain {}: publishing {}; prompts on {private}/prompts, {private}/points",
        node.fully_qualified_name(),
        settings.domain_id,
        crate::published_topics(settings)
    );
    crate::serve(bridge, stop, &publishers, || {
        drain(&prompts, "~/prompts", bridge, |m| {
            bridge.submit_detections(m)
        });
        drain(&points, "~/points", bridge, |m| bridge.submit_point(m));
    })?;
    // Dropping the node stops its spinner.
    drop(node);
    Ok(())
}
