//! ROS 2 type hashes (REP-2016, `RIHS01_…`) of the messages the bridge speaks.
//!
//! `rmw_zenoh` puts a message type's hash in every topic's key expression
//! (`<domain>/<topic>/<type>/<hash>`) and its subscribers match it exactly, so a publisher must
//! name the real hash or a stock ROS 2 node never hears it. The hash is the SHA-256 of a
//! canonical JSON form of the type's description: its name and fields (name, type id, array
//! capacity, string bound, nested type name), and the descriptions of every type it refers to,
//! directly or not, sorted by name, without comments or default values.
//!
//! The descriptions here are written from the `.msg` files of ROS 2 Jazzy (`vision_msgs` 4.x);
//! the tests check the computed hashes against the ones rosidl generates for those packages.

use sha2::{Digest, Sha256};

/// A field's type, as `type_description_interfaces/msg/FieldType` encodes it.
#[derive(Debug, Clone, Copy)]
pub enum FieldKind {
    /// A primitive (one of the `FIELD_TYPE_*` ids 2..=18, e.g. [`INT32`]).
    Primitive(u8),
    /// An unbounded sequence of a primitive (`uint8[]`).
    PrimitiveSequence(u8),
    /// A fixed-size array of a primitive (`float64[36]`).
    PrimitiveArray(u8, u64),
    /// A nested message.
    Nested(&'static MessageDescription),
    /// An unbounded sequence of a nested message.
    NestedSequence(&'static MessageDescription),
}

/// `FIELD_TYPE_NESTED_TYPE`.
const NESTED: u8 = 1;
/// `FIELD_TYPE_UINT8`.
pub const UINT8: u8 = 3;
/// `FIELD_TYPE_INT32`.
pub const INT32: u8 = 6;
/// `FIELD_TYPE_UINT32`.
pub const UINT32: u8 = 7;
/// `FIELD_TYPE_DOUBLE` (`float64`).
pub const FLOAT64: u8 = 11;
/// `FIELD_TYPE_STRING` (unbounded).
pub const STRING: u8 = 17;
/// Added to a base id for a fixed-size array.
const ARRAY: u8 = 48;
/// Added to a base id for an unbounded sequence.
const SEQUENCE: u8 = 144;

/// One message type: `package/msg/Name` and its fields in `.msg` order.
#[derive(Debug)]
pub struct MessageDescription {
    /// `package/msg/Name`.
    pub name: &'static str,
    /// `(field name, type)`.
    pub fields: &'static [(&'static str, FieldKind)],
}

impl FieldKind {
    /// `(type_id, capacity, nested type)` of the description's JSON.
    fn encoded(self) -> (u8, u64, Option<&'static MessageDescription>) {
        match self {
            FieldKind::Primitive(id) => (id, 0, None),
            FieldKind::PrimitiveSequence(id) => (id + SEQUENCE, 0, None),
            FieldKind::PrimitiveArray(id, n) => (id + ARRAY, n, None),
            FieldKind::Nested(m) => (NESTED, 0, Some(m)),
            FieldKind::NestedSequence(m) => (NESTED + SEQUENCE, 0, Some(m)),
        }
    }
}

impl MessageDescription {
    /// `RIHS01_` and the lowercase hex SHA-256 of [`MessageDescription::canonical_json`].
    pub fn rihs01(&'static self) -> String {
        let digest = Sha256::digest(self.canonical_json().as_bytes());
        let mut out = String::from("RIHS01_");
        for byte in digest {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }

    /// The JSON that is hashed: as Python's `json.dumps` writes it (`", "` and `": "`), keys in
    /// the order of the `TypeDescription` message.
    pub fn canonical_json(&'static self) -> String {
        let mut referenced: Vec<&'static MessageDescription> = Vec::new();
        self.collect_referenced(&mut referenced);
        referenced.sort_by_key(|m| m.name);
        let mut out = String::from("{\"type_description\": ");
        self.write_json(&mut out);
        out.push_str(", \"referenced_type_descriptions\": [");
        for (i, m) in referenced.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            m.write_json(&mut out);
        }
        out.push_str("]}");
        out
    }

    /// Every type this one refers to, directly or not, once each.
    fn collect_referenced(&'static self, into: &mut Vec<&'static MessageDescription>) {
        for (_, kind) in self.fields {
            if let (_, _, Some(nested)) = kind.encoded() {
                if !into.iter().any(|m| m.name == nested.name) {
                    into.push(nested);
                    nested.collect_referenced(into);
                }
            }
        }
    }

    fn write_json(&self, out: &mut String) {
        // Names are ROS identifiers (letters, digits, `_`, `/`): nothing to escape.
        out.push_str(&format!(
            "{{\"type_name\": \"{}\", \"fields\": [",
            self.name
        ));
        for (i, (name, kind)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let (id, capacity, nested) = kind.encoded();
            out.push_str(&format!(
                "{{\"name\": \"{name}\", \"type\": {{\"type_id\": {id}, \"capacity\": {capacity}, \
                 \"string_capacity\": 0, \"nested_type_name\": \"{}\"}}}}",
                nested.map_or("", |m| m.name)
            ));
        }
        out.push_str("]}");
    }
}

use FieldKind::{Nested, NestedSequence, Primitive, PrimitiveArray, PrimitiveSequence};

/// `builtin_interfaces/msg/Time`.
pub static TIME: MessageDescription = MessageDescription {
    name: "builtin_interfaces/msg/Time",
    fields: &[("sec", Primitive(INT32)), ("nanosec", Primitive(UINT32))],
};
/// `std_msgs/msg/Header`.
pub static HEADER: MessageDescription = MessageDescription {
    name: "std_msgs/msg/Header",
    fields: &[("stamp", Nested(&TIME)), ("frame_id", Primitive(STRING))],
};
/// `sensor_msgs/msg/Image`.
pub static IMAGE: MessageDescription = MessageDescription {
    name: "sensor_msgs/msg/Image",
    fields: &[
        ("header", Nested(&HEADER)),
        ("height", Primitive(UINT32)),
        ("width", Primitive(UINT32)),
        ("encoding", Primitive(STRING)),
        ("is_bigendian", Primitive(UINT8)),
        ("step", Primitive(UINT32)),
        ("data", PrimitiveSequence(UINT8)),
    ],
};
/// `sensor_msgs/msg/CompressedImage`.
pub static COMPRESSED_IMAGE: MessageDescription = MessageDescription {
    name: "sensor_msgs/msg/CompressedImage",
    fields: &[
        ("header", Nested(&HEADER)),
        ("format", Primitive(STRING)),
        ("data", PrimitiveSequence(UINT8)),
    ],
};
/// `geometry_msgs/msg/Point`.
pub static POINT: MessageDescription = MessageDescription {
    name: "geometry_msgs/msg/Point",
    fields: &[
        ("x", Primitive(FLOAT64)),
        ("y", Primitive(FLOAT64)),
        ("z", Primitive(FLOAT64)),
    ],
};
/// `geometry_msgs/msg/PointStamped`.
pub static POINT_STAMPED: MessageDescription = MessageDescription {
    name: "geometry_msgs/msg/PointStamped",
    fields: &[("header", Nested(&HEADER)), ("point", Nested(&POINT))],
};
/// `geometry_msgs/msg/Quaternion` (its `w` defaults to 1; defaults are not hashed).
pub static QUATERNION: MessageDescription = MessageDescription {
    name: "geometry_msgs/msg/Quaternion",
    fields: &[
        ("x", Primitive(FLOAT64)),
        ("y", Primitive(FLOAT64)),
        ("z", Primitive(FLOAT64)),
        ("w", Primitive(FLOAT64)),
    ],
};
/// `geometry_msgs/msg/Pose`.
pub static POSE: MessageDescription = MessageDescription {
    name: "geometry_msgs/msg/Pose",
    fields: &[
        ("position", Nested(&POINT)),
        ("orientation", Nested(&QUATERNION)),
    ],
};
/// `geometry_msgs/msg/PoseWithCovariance`.
pub static POSE_WITH_COVARIANCE: MessageDescription = MessageDescription {
    name: "geometry_msgs/msg/PoseWithCovariance",
    fields: &[
        ("pose", Nested(&POSE)),
        ("covariance", PrimitiveArray(FLOAT64, 36)),
    ],
};
/// `vision_msgs/msg/Point2D`.
pub static POINT_2D: MessageDescription = MessageDescription {
    name: "vision_msgs/msg/Point2D",
    fields: &[("x", Primitive(FLOAT64)), ("y", Primitive(FLOAT64))],
};
/// `vision_msgs/msg/Pose2D`.
pub static POSE_2D: MessageDescription = MessageDescription {
    name: "vision_msgs/msg/Pose2D",
    fields: &[
        ("position", Nested(&POINT_2D)),
        ("theta", Primitive(FLOAT64)),
    ],
};
/// `vision_msgs/msg/BoundingBox2D`.
pub static BOUNDING_BOX_2D: MessageDescription = MessageDescription {
    name: "vision_msgs/msg/BoundingBox2D",
    fields: &[
        ("center", Nested(&POSE_2D)),
        ("size_x", Primitive(FLOAT64)),
        ("size_y", Primitive(FLOAT64)),
    ],
};
/// `vision_msgs/msg/ObjectHypothesis`.
pub static OBJECT_HYPOTHESIS: MessageDescription = MessageDescription {
    name: "vision_msgs/msg/ObjectHypothesis",
    fields: &[
        ("class_id", Primitive(STRING)),
        ("score", Primitive(FLOAT64)),
    ],
};
/// `vision_msgs/msg/ObjectHypothesisWithPose`.
pub static OBJECT_HYPOTHESIS_WITH_POSE: MessageDescription = MessageDescription {
    name: "vision_msgs/msg/ObjectHypothesisWithPose",
    fields: &[
        ("hypothesis", Nested(&OBJECT_HYPOTHESIS)),
        ("pose", Nested(&POSE_WITH_COVARIANCE)),
    ],
};
/// `vision_msgs/msg/Detection2D`.
pub static DETECTION_2D: MessageDescription = MessageDescription {
    name: "vision_msgs/msg/Detection2D",
    fields: &[
        ("header", Nested(&HEADER)),
        ("results", NestedSequence(&OBJECT_HYPOTHESIS_WITH_POSE)),
        ("bbox", Nested(&BOUNDING_BOX_2D)),
        ("id", Primitive(STRING)),
    ],
};
/// `vision_msgs/msg/Detection2DArray`.
pub static DETECTION_2D_ARRAY: MessageDescription = MessageDescription {
    name: "vision_msgs/msg/Detection2DArray",
    fields: &[
        ("header", Nested(&HEADER)),
        ("detections", NestedSequence(&DETECTION_2D)),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The hashes rosidl generates for these types (ROS 2 Jazzy and later: the
    /// `*__TYPE_HASH` constants of the generated C headers).
    #[test]
    fn hashes_are_the_ones_rosidl_generates() {
        let known: [(&'static MessageDescription, &str); 8] = [
            (
                &TIME,
                "b106235e25a4c5ed35098aa0a61a3ee9c9b18d197f398b0e4206cea9acf9c197",
            ),
            (
                &HEADER,
                "f49fb3ae2cf070f793645ff749683ac6b06203e41c891e17701b1cb597ce6a01",
            ),
            (
                &IMAGE,
                "d31d41a9a4c4bc8eae9be757b0beed306564f7526c88ea6a4588fb9582527d47",
            ),
            (
                &COMPRESSED_IMAGE,
                "15640771531571185e2efc8a100baf923961a4d15d5569652e6cb6691e8e371a",
            ),
            (
                &POINT,
                "6963084842a9b04494d6b2941d11444708d892da2f4b09843b9c43f42a7f6881",
            ),
            (
                &POINT_STAMPED,
                "4c0296af86e01e562e9e0405d138a01537247580076c58ea38d7923ac1045897",
            ),
            (
                &BOUNDING_BOX_2D,
                "008eacbb0cf8f26e83795547bed013eec3675485ef386ec056d80eaaf1c1ce2f",
            ),
            (
                &DETECTION_2D_ARRAY,
                "214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968",
            ),
        ];
        for (message, hash) in known {
            assert_eq!(
                message.rihs01(),
                format!("RIHS01_{hash}"),
                "{}",
                message.name
            );
        }
    }

    #[test]
    fn referenced_types_are_listed_once_sorted_by_name() {
        let json = DETECTION_2D_ARRAY.canonical_json();
        let names: Vec<&str> = json
            .split("\"type_name\": \"")
            .skip(2) // the prefix and the type itself
            .map(|s| s.split('"').next().unwrap_or(""))
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), 12, "{names:?}");
    }
}
