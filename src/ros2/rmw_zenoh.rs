//! How `rmw_zenoh` (ROS 2's Zenoh middleware, tier 1 from Kilted) lays ROS 2 onto Zenoh, for the
//! bridge's Zenoh transport: key expressions, discovery tokens, the per-message attachment and
//! the CDR payload. Pure data, no Zenoh session: the binary (`tinysam-ros2`, feature `zenoh`)
//! declares what these functions name.
//!
//! - A topic is the key `<domain>/<topic without its leading />/<DDS type name>/<RIHS01 hash>`;
//!   rmw_zenoh's subscribers match the hash, so publishers name the real one
//!   ([`super::type_hash`]). Our subscriptions take any hash (`*`), as rmw_zenoh's do not need.
//! - The ROS graph (`ros2 node list`, `ros2 topic list`, `ros2 topic echo` finding the type)
//!   comes from liveliness tokens under `@ros2_lv/<domain>/…`: one for the node, one per
//!   publisher and subscription, naming topic, type, hash and a compact QoS string. Names in
//!   them are mangled (`/` → `%`) so that they stay one key chunk.
//! - Each message carries an attachment: sequence number (i64), source time (i64 ns) and the
//!   publisher's 16-byte GID, serialised as Zenoh's `ZSerializer` writes them (little-endian,
//!   the array behind a length byte).
//! - The payload is the message in CDR with the 4-byte encapsulation header, as on DDS.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::messages::{dds_type_name, RosMessage};

/// The admin space of the graph's liveliness tokens.
const ADMIN_SPACE: &str = "@ros2_lv";

/// The encapsulation header of little-endian plain CDR (`CDR_LE`).
const CDR_LE: [u8; 4] = [0x00, 0x01, 0x00, 0x00];
/// The encapsulation header of big-endian plain CDR (`CDR_BE`).
const CDR_BE: [u8; 4] = [0x00, 0x00, 0x00, 0x00];

/// What a liveliness token announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityKind {
    /// A message publisher (`MP`).
    Publisher,
    /// A message subscription (`MS`).
    Subscription,
}

/// The two QoS profiles the bridge uses, as the graph shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// Sensor data: best effort, keep last 1 (images).
    SensorData,
    /// ROS 2's default: reliable, keep last 10 (detections, prompts).
    Reliable,
}

impl Qos {
    /// rmw_zenoh's compact form: `reliability:durability:history,depth:deadline:lifespan:
    /// liveliness,lease`, each field empty where it is the default profile's (reliable,
    /// volatile, keep last, infinite, automatic), the depth always written. Best effort is
    /// `RMW_QOS_POLICY_RELIABILITY_BEST_EFFORT`, 2.
    pub fn encoded(self) -> &'static str {
        match self {
            Qos::SensorData => "2::,1:,:,:,,",
            Qos::Reliable => "::,10:,:,:,,",
        }
    }
}

/// `/` → `%`, and the empty name → `%`: a ROS name as one key chunk.
fn mangle(name: &str) -> String {
    if name.is_empty() {
        "%".into()
    } else {
        name.replace('/', "%")
    }
}

/// The node's place in the graph: the ids rmw_zenoh gives an entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIds {
    /// ROS domain id.
    pub domain: u16,
    /// The Zenoh session id, as Zenoh prints it (hex).
    pub session: String,
    /// The node's id within the session.
    pub node_id: u64,
    /// Node namespace, `/` or `/a/b`.
    pub namespace: String,
    /// Node name.
    pub name: String,
}

impl NodeIds {
    /// The node's liveliness token: `@ros2_lv/<domain>/<zid>/<nid>/<nid>/NN/<enclave>/<ns>/<name>`
    /// (the default enclave, empty).
    pub fn node_token(&self) -> String {
        format!(
            "{ADMIN_SPACE}/{}/{}/{id}/{id}/NN/%/{}/{}",
            self.domain,
            self.session,
            mangle(&self.namespace),
            mangle(&self.name),
            id = self.node_id,
        )
    }

    /// A publisher's or subscription's token: the node's fields with the entity's id, then topic,
    /// type, hash and QoS.
    pub fn entity_token<M: RosMessage>(
        &self,
        entity_id: u64,
        kind: EntityKind,
        topic: &str,
        qos: Qos,
    ) -> String {
        format!(
            "{ADMIN_SPACE}/{}/{}/{}/{entity_id}/{}/%/{}/{}/{}/{}/{}/{}",
            self.domain,
            self.session,
            self.node_id,
            match kind {
                EntityKind::Publisher => "MP",
                EntityKind::Subscription => "MS",
            },
            mangle(&self.namespace),
            mangle(&self.name),
            mangle(topic),
            dds_type_name::<M>(),
            M::DESCRIPTION.rihs01(),
            qos.encoded(),
        )
    }

    /// The key a publisher of `M` on `topic` (fully qualified, `/ns/node/masks`) puts to.
    pub fn topic_key<M: RosMessage>(&self, topic: &str) -> String {
        format!(
            "{}/{}/{}/{}",
            self.domain,
            topic.trim_matches('/'),
            dds_type_name::<M>(),
            M::DESCRIPTION.rihs01()
        )
    }

    /// The key a subscription takes `M` on `topic` from: any type hash.
    pub fn subscription_key<M: RosMessage>(&self, topic: &str) -> String {
        format!(
            "{}/{}/{}/*",
            self.domain,
            topic.trim_matches('/'),
            dds_type_name::<M>()
        )
    }
}

/// A publisher's 16-byte GID: derived from its liveliness token, which is unique in the graph.
pub fn gid(token: &str) -> [u8; 16] {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The attachment of one message: sequence number, source time (ns since the Unix epoch) and
/// the publisher's GID, 33 bytes.
pub fn attachment(sequence: i64, source_time_ns: i64, gid: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&source_time_ns.to_le_bytes());
    out.push(16); // the array's length, a one-byte varint
    out.extend_from_slice(gid);
    out
}

/// Why a payload is not a message.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// Shorter than the encapsulation header.
    #[error("{0} bytes: shorter than the 4-byte CDR header")]
    Short(usize),
    /// An encapsulation other than plain CDR.
    #[error("encapsulation {0:02x?} is not plain CDR (00 00 or 00 01)")]
    Encapsulation([u8; 2]),
    /// The body does not decode as the message type.
    #[error("not a {type_name}: {reason}")]
    Body {
        /// The expected type.
        type_name: String,
        /// The decoder's complaint.
        reason: String,
    },
}

/// `message` as a payload: the CDR_LE header, then the little-endian CDR body.
pub fn to_payload<M: Serialize>(message: &M) -> Result<Vec<u8>, PayloadError> {
    let body = cdr_encoding::to_vec::<M, byteorder::LittleEndian>(message).map_err(|e| {
        PayloadError::Body {
            type_name: std::any::type_name::<M>().into(),
            reason: e.to_string(),
        }
    })?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&CDR_LE);
    out.extend_from_slice(&body);
    Ok(out)
}

/// A payload as a message of type `M`, in either byte order.
pub fn from_payload<M: RosMessage + DeserializeOwned>(payload: &[u8]) -> Result<M, PayloadError> {
    let (header, body) = payload
        .split_first_chunk::<4>()
        .ok_or(PayloadError::Short(payload.len()))?;
    let decoded = if header[..2] == CDR_LE[..2] {
        cdr_encoding::from_bytes::<M, byteorder::LittleEndian>(body)
    } else if header[..2] == CDR_BE[..2] {
        cdr_encoding::from_bytes::<M, byteorder::BigEndian>(body)
    } else {
        return Err(PayloadError::Encapsulation([header[0], header[1]]));
    };
    decoded
        .map(|(message, _)| message)
        .map_err(|e| PayloadError::Body {
            type_name: format!("{}/msg/{}", M::PACKAGE, M::TYPE),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ros2::messages::{Detection2DArray, Header, Image, PointStamped, Time};

    fn ids() -> NodeIds {
        NodeIds {
            domain: 7,
            session: "a1b2".into(),
            node_id: 0,
            namespace: "/".into(),
            name: "tinysam".into(),
        }
    }

    #[test]
    fn keys_follow_rmw_zenoh() {
        let ids = ids();
        assert_eq!(
            ids.topic_key::<Image>("/tinysam/masks"),
            "7/tinysam/masks/sensor_msgs::msg::dds_::Image_/\
             RIHS01_d31d41a9a4c4bc8eae9be757b0beed306564f7526c88ea6a4588fb9582527d47"
        );
        assert_eq!(
            ids.subscription_key::<Detection2DArray>("/robot1/tinysam/prompts"),
            "7/robot1/tinysam/prompts/vision_msgs::msg::dds_::Detection2DArray_/*"
        );
        assert_eq!(ids.node_token(), "@ros2_lv/7/a1b2/0/0/NN/%/%/tinysam");
        assert_eq!(
            ids.entity_token::<PointStamped>(4, EntityKind::Subscription, "/tinysam/points", Qos::Reliable),
            "@ros2_lv/7/a1b2/0/4/MS/%/%/tinysam/%tinysam%points/geometry_msgs::msg::dds_::PointStamped_/\
             RIHS01_4c0296af86e01e562e9e0405d138a01537247580076c58ea38d7923ac1045897/::,10:,:,:,,"
        );
        let robot = NodeIds {
            namespace: "/robot1".into(),
            ..ids
        };
        assert_eq!(
            robot.node_token(),
            "@ros2_lv/7/a1b2/0/0/NN/%/%robot1/tinysam"
        );
        assert!(robot
            .entity_token::<Image>(
                1,
                EntityKind::Publisher,
                "/robot1/tinysam/masks",
                Qos::SensorData
            )
            .ends_with("/2::,1:,:,:,,"));
    }

    #[test]
    fn attachment_is_zenohs_serialisation() {
        let gid = gid("@ros2_lv/0/x");
        assert_eq!(gid, super::gid("@ros2_lv/0/x"));
        assert_ne!(gid, super::gid("@ros2_lv/0/y"));
        let bytes = attachment(5, 0x0102_0304_0506_0708, &gid);
        assert_eq!(bytes.len(), 33);
        assert_eq!(bytes[..8], 5i64.to_le_bytes());
        assert_eq!(bytes[8..16], 0x0102_0304_0506_0708i64.to_le_bytes());
        assert_eq!(bytes[16], 16);
        assert_eq!(bytes[17..], gid);
    }

    #[test]
    fn payloads_round_trip_and_bad_ones_are_errors() {
        let point = PointStamped {
            header: Header {
                stamp: Time { sec: 3, nanosec: 4 },
                frame_id: "camera".into(),
            },
            ..Default::default()
        };
        let payload = to_payload(&point).expect("encodes");
        assert_eq!(payload[..4], CDR_LE);
        assert_eq!(
            from_payload::<PointStamped>(&payload).expect("decodes"),
            point
        );
        // Big-endian CDR from another peer.
        let mut big = CDR_BE.to_vec();
        big.extend(cdr_encoding::to_vec::<_, byteorder::BigEndian>(&point).expect("encodes"));
        assert_eq!(from_payload::<PointStamped>(&big).expect("decodes"), point);
        assert!(matches!(
            from_payload::<PointStamped>(&payload[..3]),
            Err(PayloadError::Short(3))
        ));
        let mut xcdr = payload.clone();
        xcdr[1] = 0x07;
        assert!(matches!(
            from_payload::<PointStamped>(&xcdr),
            Err(PayloadError::Encapsulation(_))
        ));
        let detections = to_payload(&Detection2DArray {
            detections: vec![Default::default()],
            ..Default::default()
        })
        .expect("encodes");
        let cut = from_payload::<Detection2DArray>(&detections[..detections.len() - 3]);
        assert!(
            matches!(&cut, Err(PayloadError::Body { type_name, .. }) if type_name == "vision_msgs/msg/Detection2DArray"),
            "{cut:?}"
        );
    }
}
