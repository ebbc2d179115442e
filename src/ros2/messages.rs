//! The ROS 2 messages the bridge publishes and takes, as plain structs whose field order is the
//! `.msg` definitions' (ROS 2 Jazzy: `std_msgs`, `builtin_interfaces`, `sensor_msgs`,
//! `geometry_msgs`, `vision_msgs` 4.x). Serialised with `serde` in that order, they are the CDR
//! the DDS and Zenoh middlewares carry; byte arrays go through `serde_bytes`, so a mono16 image is
//! one copy, not a million `u8` calls.

use serde::de::{Error as _, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::type_hash::{self, MessageDescription};

/// A message type's ROS 2 name: `package/msg/Type`, which DDS spells
/// `package::msg::dds_::Type_`.
pub trait RosMessage {
    /// The package, e.g. `sensor_msgs`.
    const PACKAGE: &'static str;
    /// The type, e.g. `Image`.
    const TYPE: &'static str;
    /// Its REP-2016 description, for the type hash `rmw_zenoh` keys carry.
    const DESCRIPTION: &'static MessageDescription;
}

macro_rules! ros_message {
    ($ty:ty, $package:literal, $name:literal, $description:ident) => {
        impl RosMessage for $ty {
            const PACKAGE: &'static str = $package;
            const TYPE: &'static str = $name;
            const DESCRIPTION: &'static MessageDescription = &type_hash::$description;
        }
    };
}

/// `builtin_interfaces/Time`: seconds and nanoseconds since the Unix epoch (system clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    /// Seconds.
    pub sec: i32,
    /// Nanoseconds, `< 1e9`.
    pub nanosec: u32,
}

/// `std_msgs/Header`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// When the data was captured.
    pub stamp: Time,
    /// The coordinate frame the data is in.
    pub frame_id: String,
}

/// `sensor_msgs/Image`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Image {
    /// Stamp and frame.
    pub header: Header,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
    /// Pixel encoding, e.g. `mono16`.
    pub encoding: String,
    /// 1 if multi-byte pixels are big-endian.
    pub is_bigendian: u8,
    /// Bytes per row.
    pub step: u32,
    /// The pixels, row after row.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}
ros_message!(Image, "sensor_msgs", "Image", IMAGE);

/// `sensor_msgs/CompressedImage`: an encoded picture (`format` `jpeg` here), for viewers such as
/// RViz and `rqt_image_view`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompressedImage {
    /// Capture time and camera frame.
    pub header: Header,
    /// The encoding: `jpeg`.
    pub format: String,
    /// The encoded picture.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}
ros_message!(
    CompressedImage,
    "sensor_msgs",
    "CompressedImage",
    COMPRESSED_IMAGE
);

/// `geometry_msgs/Point`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// x.
    pub x: f64,
    /// y.
    pub y: f64,
    /// z.
    pub z: f64,
}

/// `geometry_msgs/PointStamped`: a point prompt, `x`, `y` in frame pixels.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PointStamped {
    /// Stamp and frame.
    pub header: Header,
    /// The point.
    pub point: Point,
}
ros_message!(PointStamped, "geometry_msgs", "PointStamped", POINT_STAMPED);

/// `geometry_msgs/Quaternion`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quaternion {
    /// x.
    pub x: f64,
    /// y.
    pub y: f64,
    /// z.
    pub z: f64,
    /// w.
    pub w: f64,
}

impl Default for Quaternion {
    /// The identity rotation (ROS's default for `w` is 1).
    fn default() -> Self {
        Quaternion {
            x: 0.0,
            y: 0.0,
            z: 0.0,
            w: 1.0,
        }
    }
}

/// `geometry_msgs/Pose`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Pose {
    /// Position.
    pub position: Point,
    /// Orientation.
    pub orientation: Quaternion,
}

/// The 6 × 6 row-major covariance of `geometry_msgs/PoseWithCovariance`: a fixed-size CDR array
/// (no length prefix), which serde's derive has no impl for at 36 elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Covariance(pub [f64; 36]);

impl Default for Covariance {
    fn default() -> Self {
        Covariance([0.0; 36])
    }
}

impl Serialize for Covariance {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(36)?;
        for v in &self.0 {
            tuple.serialize_element(v)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Covariance {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Elements;
        impl<'de> Visitor<'de> for Elements {
            type Value = Covariance;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("36 float64 values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Covariance, A::Error> {
                let mut out = [0.0; 36];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                Ok(Covariance(out))
            }
        }
        deserializer.deserialize_tuple(36, Elements)
    }
}

/// `geometry_msgs/PoseWithCovariance`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PoseWithCovariance {
    /// Pose.
    pub pose: Pose,
    /// Its covariance.
    pub covariance: Covariance,
}

/// `vision_msgs/Point2D`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Point2D {
    /// x.
    pub x: f64,
    /// y.
    pub y: f64,
}

/// `vision_msgs/Pose2D`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Pose2D {
    /// Position.
    pub position: Point2D,
    /// Rotation, radians.
    pub theta: f64,
}

/// `vision_msgs/BoundingBox2D`: an axis-aligned box (theta 0) by its centre and size, in pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BoundingBox2D {
    /// Centre.
    pub center: Pose2D,
    /// Width.
    pub size_x: f64,
    /// Height.
    pub size_y: f64,
}

/// `vision_msgs/ObjectHypothesis`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectHypothesis {
    /// Class.
    pub class_id: String,
    /// Confidence.
    pub score: f64,
}

/// `vision_msgs/ObjectHypothesisWithPose`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectHypothesisWithPose {
    /// Class and score.
    pub hypothesis: ObjectHypothesis,
    /// Pose (unused here: zero with identity orientation).
    pub pose: PoseWithCovariance,
}

/// `vision_msgs/Detection2D`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Detection2D {
    /// Stamp and frame.
    pub header: Header,
    /// Hypotheses.
    pub results: Vec<ObjectHypothesisWithPose>,
    /// The box.
    pub bbox: BoundingBox2D,
    /// Identifier.
    pub id: String,
}

/// `vision_msgs/Detection2DArray`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Detection2DArray {
    /// Stamp and frame.
    pub header: Header,
    /// Detections.
    pub detections: Vec<Detection2D>,
}
ros_message!(
    Detection2DArray,
    "vision_msgs",
    "Detection2DArray",
    DETECTION_2D_ARRAY
);

/// The DDS topic type name of `M`, as ROS 2 middlewares register it
/// (`sensor_msgs::msg::dds_::Image_`).
pub fn dds_type_name<M: RosMessage>() -> String {
    format!("{}::msg::dds_::{}_", M::PACKAGE, M::TYPE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use byteorder::LittleEndian;

    fn cdr<T: Serialize>(value: &T) -> Vec<u8> {
        cdr_encoding::to_vec::<T, LittleEndian>(value).expect("serialises")
    }

    #[test]
    fn type_names_are_the_dds_spelling() {
        assert_eq!(dds_type_name::<Image>(), "sensor_msgs::msg::dds_::Image_");
        assert_eq!(
            dds_type_name::<Detection2DArray>(),
            "vision_msgs::msg::dds_::Detection2DArray_"
        );
        assert_eq!(
            dds_type_name::<PointStamped>(),
            "geometry_msgs::msg::dds_::PointStamped_"
        );
    }

    /// The covariance is a fixed array: 36 doubles and no length; a pose with covariance is
    /// 7 + 36 doubles.
    #[test]
    fn covariance_is_a_fixed_array() {
        let mut c = Covariance::default();
        c.0[35] = 2.5;
        let bytes = cdr(&PoseWithCovariance {
            covariance: c,
            ..Default::default()
        });
        assert_eq!(bytes.len(), 43 * 8);
        assert_eq!(bytes[42 * 8..], 2.5f64.to_le_bytes());
        let (back, used) =
            cdr_encoding::from_bytes::<PoseWithCovariance, LittleEndian>(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back.covariance, c);
        assert_eq!(back.pose.orientation.w, 1.0);
    }

    /// An image: header (time, frame id), sizes, encoding, flag, step, then the pixels as one
    /// length-prefixed byte run, as the .msg order and CDR alignment say.
    #[test]
    fn image_layout_follows_the_msg_definition() {
        let image = Image {
            header: Header {
                stamp: Time { sec: 7, nanosec: 9 },
                frame_id: "cam".into(),
            },
            height: 1,
            width: 2,
            encoding: "mono16".into(),
            is_bigendian: 0,
            step: 4,
            data: vec![1, 0, 2, 0],
        };
        let bytes = cdr(&image);
        let mut expected = Vec::new();
        expected.extend(7i32.to_le_bytes());
        expected.extend(9u32.to_le_bytes());
        expected.extend(4u32.to_le_bytes()); // "cam" + NUL
        expected.extend(b"cam\0");
        expected.extend(1u32.to_le_bytes());
        expected.extend(2u32.to_le_bytes());
        expected.extend(7u32.to_le_bytes());
        expected.extend(b"mono16\0");
        expected.push(0); // is_bigendian
        expected.extend(4u32.to_le_bytes()); // step, 4-aligned: offset 36
        expected.extend(4u32.to_le_bytes());
        expected.extend([1, 0, 2, 0]);
        assert_eq!(bytes, expected);
        let (back, _) = cdr_encoding::from_bytes::<Image, LittleEndian>(&bytes).unwrap();
        assert_eq!(back, image);
    }

    #[test]
    fn detections_round_trip() {
        let array = Detection2DArray {
            header: Header {
                stamp: Time { sec: 1, nanosec: 2 },
                frame_id: "camera".into(),
            },
            detections: vec![Detection2D {
                results: vec![ObjectHypothesisWithPose {
                    hypothesis: ObjectHypothesis {
                        class_id: "3".into(),
                        score: 0.5,
                    },
                    ..Default::default()
                }],
                id: "1".into(),
                ..Default::default()
            }],
        };
        let bytes = cdr(&array);
        let (back, _) = cdr_encoding::from_bytes::<Detection2DArray, LittleEndian>(&bytes).unwrap();
        assert_eq!(back, array);
        // Cut short, it is an error, not a panic.
        for cut in [0, 5, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                cdr_encoding::from_bytes::<Detection2DArray, LittleEndian>(&bytes[..cut]).is_err()
            );
        }
    }
}
